/* The /ui page: submits one image or PDF to the jobs API, follows its Server-Sent Events, renders each page as
 * it finishes, and downloads the ZIP. Every call sends the API key from the password field (kept in
 * sessionStorage, so it is gone when the tab closes). EventSource cannot send headers, so the event stream is
 * read with fetch() and parsed here; a plain <a href> could not send the key either, so the ZIP is fetched as
 * a blob and saved through an object URL. URLs are relative to the page, so it also works under a root path. */
(function () {
  "use strict";

  const KEY = "deepseek-ocr.api-key";
  const TERMINAL = new Set(["done", "failed", "cancelled"]);
  const COLORS = { title: "#d1495b", text: "#2f6fed", table: "#0a8f5a", image: "#b86e00", formula: "#7b3fc4" };
  const $ = (id) => document.getElementById(id);
  let current = null; // {id, name, kind, imageUrl, lastEventId, ended, abort}

  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem(KEY) || "";
  keyInput.addEventListener("input", () => sessionStorage.setItem(KEY, keyInput.value));

  function auth(extra) {
    const key = keyInput.value.trim();
    return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
  }

  /* fetch with the key; a non-2xx answer becomes an Error carrying the problem+json detail. */
  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = auth(opts.headers);
    const response = await fetch(path, opts);
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const problem = await response.json();
        detail = problem.detail || problem.title || JSON.stringify(problem);
      } catch (_) { /* not JSON */ }
      const error = new Error(response.status + ": " + detail);
      error.status = response.status;
      throw error;
    }
    return response;
  }

  function say(text) { $("message").textContent = text || ""; }

  function setStatus(node, status) {
    node.textContent = status;
    node.className = "status " + status;
  }

  function setProgress(done, total) {
    const pct = total ? Math.min(100, Math.round((100 * done) / total)) : 0;
    $("progress").value = pct;
    $("progress-text").textContent = (total ? done + " / " + total + " pages, " : "") + pct + "%";
  }

  /* ---- submitting ---- */

  async function submit(file) {
    if (current && !current.ended) current.abort.abort();
    if (current && current.imageUrl) URL.revokeObjectURL(current.imageUrl);
    const isPdf = file.type === "application/pdf" || /\.pdf$/i.test(file.name);
    current = { id: null, name: file.name, kind: isPdf ? "pdf" : "image", lastEventId: null, ended: false,
      imageUrl: isPdf ? null : URL.createObjectURL(file), abort: new AbortController() };
    $("pages").replaceChildren();
    $("job").hidden = false;
    $("job-name").textContent = file.name;
    $("pdf-note").hidden = !isPdf;
    $("download").hidden = true;
    $("cancel").hidden = true;
    setStatus($("job-status"), "uploading");
    setProgress(0, 0);
    say("");
    const form = new FormData();
    form.append("file", file, file.name);
    const job = current;
    try {
      const body = await (await api("jobs", { method: "POST", body: form })).json();
      job.id = body.id;
      $("job").dataset.jobId = body.id;
      setStatus($("job-status"), body.status);
      setProgress(body.pages_done, body.pages_total);
      $("cancel").hidden = false;
      await follow(job);
    } catch (error) {
      if (error.name === "AbortError") return;
      setStatus($("job-status"), "error");
      say(error.status === 401 ? "The server wants an API key: type it above and drop the file again." : error.message);
    }
  }

  /* ---- the event stream, read with fetch ---- */

  function sseParser(onMessage) {
    let buffer = "";
    let data = [];
    let event = "";
    let id = null;
    return function (chunk) {
      buffer += chunk;
      let m;
      while ((m = /\r\n|\r|\n/.exec(buffer)) !== null) {
        if (m[0] === "\r" && m.index === buffer.length - 1) break; // maybe half of a \r\n: wait for more
        const line = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        if (line === "") {
          if (data.length) onMessage({ event: event || "message", data: data.join("\n"), id: id });
          data = [];
          event = "";
          continue;
        }
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "event") event = value;
        else if (field === "id") id = value;
      }
    };
  }

  /* Read events until the terminal one; a dropped stream is reopened after the last event seen (Last-Event-ID),
   * so no page is lost or shown twice. */
  async function follow(job) {
    for (let attempt = 0; !job.ended; attempt++) {
      try {
        const headers = job.lastEventId ? { "Last-Event-ID": job.lastEventId } : {};
        const response = await api("jobs/" + job.id + "/events", { headers: headers, signal: job.abort.signal });
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        const feed = sseParser((message) => handle(job, message));
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          feed(value);
          attempt = 0;
        }
      } catch (error) {
        if (error.name === "AbortError") return;
        if (error.status && error.status < 500) throw error;
        if (attempt >= 5) throw error;
      }
      if (!job.ended) await new Promise((resolve) => setTimeout(resolve, 1000 * Math.min(attempt + 1, 5)));
    }
  }

  function handle(job, message) {
    if (job !== current) return;
    if (message.id) job.lastEventId = message.id;
    let data = {};
    try { data = JSON.parse(message.data); } catch (_) { return; }
    if (message.event === "page") showPage(job, data);
    else if (message.event === "progress") {
      setStatus($("job-status"), "running");
      setProgress(data.pages_done, data.pages_total);
    } else if (TERMINAL.has(message.event)) finish(job, message.event, data);
  }

  function finish(job, status, summary) {
    job.ended = true;
    setStatus($("job-status"), status);
    setProgress(summary.pages_done, summary.pages_total);
    $("cancel").hidden = true;
    $("download").hidden = !summary.pages_done || summary.pages_done === summary.pages_failed;
    if (status !== "done") say(summary.error || "The job " + status + ".");
    else if (summary.pages_failed) say(summary.pages_failed + " page(s) failed; see them below.");
  }

  /* ---- pages ---- */

  function pageSection(n, label) {
    let section = document.querySelector('.page[data-page="' + n + '"]');
    if (section) return section;
    section = document.createElement("section");
    section.className = "page";
    section.dataset.page = n;
    const title = section.appendChild(document.createElement("h2"));
    title.append(label);
    title.appendChild(document.createElement("span")).className = "status";
    const sheet = section.appendChild(document.createElement("div"));
    sheet.className = "sheet";
    const right = section.appendChild(document.createElement("div"));
    right.appendChild(document.createElement("div")).className = "md";
    const details = right.appendChild(document.createElement("details"));
    details.className = "source";
    details.appendChild(document.createElement("summary")).textContent = "Markdown source";
    details.appendChild(document.createElement("pre")).className = "md-source";
    // Sections stay in page order even if pages finish out of order.
    const later = [...$("pages").children].find((s) => Number(s.dataset.page) > n);
    $("pages").insertBefore(section, later || null);
    return section;
  }

  function showMarkdown(section, markdown, error) {
    const md = section.querySelector(".md");
    md.replaceChildren();
    if (error) md.appendChild(document.createElement("p")).className = "error";
    if (error) md.lastChild.textContent = typeof error === "string" ? error : JSON.stringify(error);
    if (markdown) md.appendChild(window.renderMarkdown(markdown));
    else if (!error) {
      md.appendChild(document.createElement("p")).className = "empty";
      md.lastChild.textContent = "(no text on this page)";
    }
    section.querySelector(".md-source").textContent = markdown || "";
  }

  async function showPage(job, event) {
    const n = event.page !== undefined ? event.page : event.index;
    const section = pageSection(n, event.page !== undefined ? "Page " + n : event.file || "Image");
    setStatus(section.querySelector("h2 .status"), event.status);
    showMarkdown(section, event.markdown, event.error);
    if (event.status === "failed") return;
    try {
      const page = await (await api("jobs/" + job.id + "/pages/" + n, { signal: job.abort.signal })).json();
      showMarkdown(section, page.markdown, null);
      drawSheet(job, section, page);
    } catch (error) {
      if (error.name !== "AbortError") say("Page " + n + ": " + error.message);
    }
  }

  /* Boxes from the page's blocks (PDF pages), or parsed from the raw output's grounding tags (images, whose
   * job result lists no blocks): [label, [x1, y1, x2, y2] on the 0..999 grid, the block's text if known]. */
  function boxesOf(page) {
    if (Array.isArray(page.blocks)) {
      return page.blocks.flatMap((b) => b.boxes.map((box) => [b.label, box.grid, b.text]));
    }
    const found = [];
    const tag = /<\|ref\|>([\s\S]*?)<\|\/ref\|>\s*<\|det\|>([\s\S]*?)<\|\/det\|>/g;
    for (const m of String(page.text || "").matchAll(tag)) {
      for (const box of m[2].matchAll(/\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]/g)) {
        found.push([m[1].trim(), box.slice(1, 5).map(Number)]);
      }
    }
    return found;
  }

  function drawSheet(job, section, page) {
    const sheet = section.querySelector(".sheet");
    sheet.replaceChildren();
    if (job.imageUrl) {
      const img = sheet.appendChild(document.createElement("img"));
      img.src = job.imageUrl;
      img.alt = job.name;
    } else {
      sheet.classList.add("blank");
      if (page.width && page.height) sheet.style.aspectRatio = page.width + " / " + page.height;
    }
    const overlay = sheet.appendChild(document.createElement("div"));
    overlay.className = "overlay";
    const pct = (v) => Math.min(100, Math.max(0, (v / 999) * 100)) + "%";
    for (const [label, g, text] of boxesOf(page)) {
      if (!g || g.length !== 4 || g.some((v) => !Number.isFinite(v))) continue;
      const box = overlay.appendChild(document.createElement("div"));
      box.className = "box";
      box.dataset.label = label;
      box.title = text ? label + ": " + text.slice(0, 300) : label;
      box.style.left = pct(Math.min(g[0], g[2]));
      box.style.top = pct(Math.min(g[1], g[3]));
      box.style.width = pct(Math.abs(g[2] - g[0]));
      box.style.height = pct(Math.abs(g[3] - g[1]));
      box.style.setProperty("--c", COLORS[label] || "#555");
      box.appendChild(document.createElement("span")).textContent = label;
    }
  }

  /* ---- download and cancel ---- */

  function filenameOf(disposition, fallback) {
    const star = /filename\*=UTF-8''([^;]+)/i.exec(disposition || "");
    if (star) return decodeURIComponent(star[1]);
    const plain = /filename="?([^";]+)"?/i.exec(disposition || "");
    return plain ? plain[1] : fallback;
  }

  $("download").addEventListener("click", async () => {
    const job = current;
    if (!job || !job.id) return;
    try {
      const response = await api("jobs/" + job.id + "/download");
      const url = URL.createObjectURL(await response.blob());
      const link = document.createElement("a");
      link.href = url;
      link.download = filenameOf(response.headers.get("Content-Disposition"), job.id + ".zip");
      document.body.appendChild(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (error) {
      say("Download: " + error.message);
    }
  });

  $("cancel").addEventListener("click", async () => {
    if (!current || !current.id) return;
    try { await api("jobs/" + current.id, { method: "DELETE" }); } catch (error) { say(error.message); }
  });

  /* ---- choosing and dropping ---- */

  $("file").addEventListener("change", (e) => {
    if (e.target.files.length) submit(e.target.files[0]);
    e.target.value = "";
  });
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) submit(e.dataTransfer.files[0]);
  });
})();
