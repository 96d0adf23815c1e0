/* The /ui page: each dropped file becomes a job (POST /jobs) in the queue; the jobs list (GET /jobs) is the
 * history, so it survives a reload. The job in view is followed through its Server-Sent Events (replayed from the
 * first event, so an old job is drawn the same way as a running one) and its status document (per-page state and
 * ETA while it runs). A PDF page is shown as the image the server kept when it rendered it
 * (`/jobs/{id}/pages/{n}/image`), with the layout boxes of its answer over it and its text beside it.
 *
 * Every call sends the API key from the key field (kept in sessionStorage, gone when the tab closes). EventSource
 * and <img src> cannot send headers, so the stream is read with fetch() and images are fetched as blobs. */
(function () {
  "use strict";

  const KEY = "deepseek-ocr.api-key";
  const TERMINAL = new Set(["done", "failed", "cancelled"]);
  const ACTIVE = new Set(["queued", "running"]);
  const COLORS = { title: "#d1495b", text: "#2f6fed", table: "#0a8f5a", image: "#b86e00", formula: "#7b3fc4" };
  const BADGES = {
    ok: "The model finished the page on its own.",
    retried: "The first answer ran away (repeated itself or hit the token limit); a stricter attempt was kept.",
    degraded: "Kept from a retry at a smaller mode or a plainer prompt: read it with care.",
    truncated: "Stopped at the token limit (max_tokens): the end may be missing. Normal with the demo's random weights.",
    failed: "No text: the reason is shown below.",
    aborted: "The engine stopped this page (it was cancelled or preempted).",
    running: "On the engine now.",
    queued: "Waiting for its turn.",
    cancelled: "The job was cancelled before this page ran.",
  };
  const $ = (id) => document.getElementById(id);
  const files = window.ocrFiles;
  const jobs = new Map(); // id -> summary from GET /jobs or POST /jobs, plus `urls` for this tab's own images
  let view = null; // the job in view: {job, abort, lastEventId, ended, pages: Map(n -> {...}), timer}
  let queueTimer = null;

  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem(KEY) || "";

  function auth(extra) {
    const key = keyInput.value.trim();
    return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
  }

  /* fetch with the key; a non-2xx answer becomes an Error carrying the problem+json detail. The server answers a
   * missing and a wrong key alike (401), so the page says which one it was from what it sent. */
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
      if (response.status === 401) {
        error.message = keyInput.value.trim()
          ? "Wrong API key: the server refused the key typed above. Check it against the server's API_KEY."
          : "This server needs an API key: type it in the API key field above.";
        error.key = keyInput.value.trim() ? "wrong" : "missing";
      }
      throw error;
    }
    return response;
  }

  function say(text, kind) {
    const node = $("message");
    node.textContent = text || "";
    node.dataset.kind = kind || "";
  }

  function setStatus(node, status) {
    node.textContent = status;
    node.className = "status " + status;
    node.title = BADGES[status] || "";
  }

  function stemOf(name) { return String(name || "document").replace(/\.[^./]+$/, "") || "document"; }

  /* ---- server info: the demo notice, modes, models, prompt presets ---- */

  async function loadInfo() {
    try {
      const health = await (await fetch("health")).json();
      $("demo").hidden = !health.demo;
      $("demo").textContent = health.demo ? (health.notice || "Demo: the model has random weights.")
        + " The pages, boxes, queue and downloads work as they will with the real weights." : "";
    } catch (_) { /* the notice is a courtesy */ }
    try {
      const root = await (await api("./")).json();
      fill($("opt-mode"), (root.modes || []).map((m) => [m, m]));
      fill($("opt-model"), (root.models || []).map((m) => [m.name, m.name]));
      const info = await (await api("pdf/info")).json();
      fill($("opt-preset"), Object.entries(info.prompts || {}).map(([name, prompt]) => [prompt, name]));
      if (!$("opt-preset").querySelector('option[value="own"]')) {
        $("opt-preset").append(new Option("my own prompt…", "own"));
      }
    } catch (_) { /* without the key (or the PDF router) the defaults stay; the queue says why */ }
  }

  function fill(select, entries) {
    const first = select.options[0];
    const keep = select.value;
    select.replaceChildren(first);
    for (const [value, label] of entries) select.append(new Option(label, value));
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  }

  $("opt-preset").addEventListener("change", () => { $("own-prompt").hidden = $("opt-preset").value !== "own"; });

  function optionsForm() {
    const form = new FormData();
    const preset = $("opt-preset").value;
    const prompt = preset === "own" ? $("opt-prompt").value : preset;
    const fields = { prompt: prompt, mode: $("opt-mode").value, model: $("opt-model").value,
      pages: $("opt-pages").value.trim(), dpi: $("opt-dpi").value.trim(), password: $("opt-password").value };
    for (const [name, value] of Object.entries(fields)) if (value) form.append(name, value);
    return form;
  }

  /* ---- the queue: every job of this key, newest first ---- */

  async function refreshQueue() {
    clearTimeout(queueTimer);
    try {
      const body = await (await api("jobs?limit=50")).json();
      for (const summary of body.jobs) jobs.set(summary.id, Object.assign(jobs.get(summary.id) || {}, summary));
      drawQueue(body.jobs.map((s) => s.id));
      if (body.jobs.some((s) => ACTIVE.has(s.status))) queueTimer = setTimeout(refreshQueue, 2000);
    } catch (error) {
      $("queue-empty").hidden = false;
      $("queue-empty").textContent = error.key ? error.message : "Jobs: " + error.message;
      if (error.key) say(error.message, "key");
    }
  }

  /* Entries are kept and updated in place (a redraw would take the focus and the hover from under the user). */
  function drawQueue(ids) {
    const list = $("queue");
    const old = new Map([...list.children].map((item) => [item.dataset.jobId, item]));
    ids.forEach((id, at) => {
      const job = jobs.get(id);
      let item = old.get(id);
      if (!item) {
        item = document.createElement("li");
        item.dataset.jobId = id;
        const button = item.appendChild(document.createElement("button"));
        button.type = "button";
        button.className = "queue-item";
        button.appendChild(document.createElement("span")).className = "name";
        button.appendChild(document.createElement("span"));
        button.appendChild(document.createElement("span")).className = "count";
        button.addEventListener("click", () => show(jobs.get(id)));
      }
      const [name, status, count] = item.firstChild.children;
      name.textContent = job.name || job.filename || (job.kind === "batch" ? "images" : id);
      setStatus(status, job.status);
      count.textContent = job.pages_done + "/" + job.pages_total;
      item.classList.toggle("current", !!view && view.job.id === id);
      if (list.children[at] !== item) list.insertBefore(item, list.children[at] || null);
      old.delete(id);
    });
    for (const item of old.values()) item.remove();
    $("queue-empty").hidden = ids.length > 0;
    $("queue-empty").textContent = "No jobs yet.";
  }

  /* ---- submitting: each file its own job ---- */

  async function submit(list) {
    const chosen = [...list];
    let first = null;
    say("");
    for (const file of chosen) {
      const form = optionsForm();
      form.append("file", file, file.name);
      try {
        const body = await (await api("jobs", { method: "POST", body: form })).json();
        const isPdf = body.kind === "pdf";
        jobs.set(body.id, Object.assign(body, { name: file.name, urls: isPdf ? null : [URL.createObjectURL(file)] }));
        first = first || body;
      } catch (error) {
        say(file.name + ": " + error.message, error.key ? "key" : "error");
      }
    }
    if (first) show(first);
    await refreshQueue();
  }

  /* ---- the job in view ---- */

  function show(job) {
    if (view) { view.abort.abort(); clearTimeout(view.timer); }
    for (const page of view ? view.pages.values() : []) if (page.image) URL.revokeObjectURL(page.image);
    view = { job: job, abort: new AbortController(), lastEventId: null, ended: false, pages: new Map(), timer: null };
    history.replaceState(null, "", "#job=" + job.id);
    $("pages").replaceChildren();
    $("strip").replaceChildren();
    $("job").hidden = false;
    $("job").dataset.jobId = job.id;
    $("job-name").textContent = job.name || job.filename || job.id;
    $("doc-actions").hidden = true;
    for (const b of document.querySelectorAll("[data-pdf-only]")) b.hidden = job.kind !== "pdf";
    $("eta").textContent = "";
    for (const item of $("queue").children) item.classList.toggle("current", item.dataset.jobId === job.id);
    jobHead(job);
    const current = view;
    poll(current).then(() => follow(current)).catch((error) => {
      if (error.name !== "AbortError") say(error.message, error.key ? "key" : "error");
    });
  }

  function jobHead(summary) {
    setStatus($("job-status"), summary.status);
    const total = summary.pages_total || 0;
    const done = summary.pages_done || 0;
    const pct = total ? Math.min(100, Math.round((100 * done) / total)) : 0;
    $("progress").value = pct;
    $("progress-text").textContent = (total ? done + " / " + total + " pages, " : "") + pct + "%";
    $("cancel").hidden = !ACTIVE.has(summary.status);
    if (summary.eta_s !== undefined) {
      $("eta").textContent = summary.eta_s != null && ACTIVE.has(summary.status)
        ? "about " + formatSeconds(summary.eta_s) + " left" : "";
    }
  }

  function formatSeconds(s) {
    return s < 90 ? Math.max(1, Math.round(s)) + " s" : Math.round(s / 60) + " min";
  }

  /* The status document: one section per page from the start (the strip too), each page's state (running, not
   * "queued", while the engine has it), the ETA. Polled while the job runs. */
  async function poll(current) {
    const detail = await (await api("jobs/" + current.job.id, { signal: current.abort.signal })).json();
    if (current !== view) return;
    Object.assign(current.job, detail);
    if (!current.ended) jobHead(detail);
    for (const entry of detail.pages) {
      const n = entry.page !== undefined && entry.page !== null ? entry.page : entry.index;
      const section = pageSection(current, n, entry.page != null ? "Page " + n : entry.file || "Image " + n);
      if (!current.pages.get(n).final) setStatus(section.querySelector("h2 .status"), entry.status);
    }
    if (ACTIVE.has(detail.status)) {
      current.timer = setTimeout(() => poll(current).catch(() => {}), 2000);
    }
  }

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
  async function follow(current) {
    for (let attempt = 0; !current.ended; attempt++) {
      try {
        const headers = current.lastEventId ? { "Last-Event-ID": current.lastEventId } : {};
        const response = await api("jobs/" + current.job.id + "/events",
          { headers: headers, signal: current.abort.signal });
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        const feed = sseParser((message) => handle(current, message));
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          feed(value);
          attempt = 0;
        }
      } catch (error) {
        if (error.name === "AbortError") return;
        if ((error.status && error.status < 500) || attempt >= 5) throw error;
      }
      if (!current.ended) await new Promise((resolve) => setTimeout(resolve, 1000 * Math.min(attempt + 1, 5)));
    }
  }

  function handle(current, message) {
    if (current !== view) return;
    if (message.id) current.lastEventId = message.id;
    let data = {};
    try { data = JSON.parse(message.data); } catch (_) { return; }
    if (message.event === "page") showPage(current, data);
    else if (message.event === "progress") {
      jobHead(Object.assign(current.job, data, { status: current.job.status === "queued" ? "running"
        : current.job.status }));
    } else if (TERMINAL.has(message.event)) finish(current, message.event, data);
  }

  function finish(current, status, summary) {
    current.ended = true;
    clearTimeout(current.timer);
    Object.assign(current.job, summary, { status: status });
    jobHead(Object.assign({}, current.job, { eta_s: null }));
    $("doc-actions").hidden = !summary.pages_done || summary.pages_done === summary.pages_failed;
    if (status !== "done") say(summary.error || "The job " + status + ".", "error");
    else if (summary.pages_failed) say(summary.pages_failed + " page(s) failed; see them below.", "error");
    refreshQueue();
  }

  /* ---- pages ---- */

  function pageSection(current, n, label) {
    let section = $("pages").querySelector('.page[data-page="' + n + '"]');
    if (section) return section;
    current.pages.set(n, { label: label, final: false });
    section = document.createElement("section");
    section.className = "page";
    section.dataset.page = n;
    section.id = "page-" + n;
    const title = section.appendChild(document.createElement("h2"));
    title.append(label);
    setStatus(title.appendChild(document.createElement("span")), "queued");
    const actions = title.appendChild(document.createElement("span"));
    actions.className = "actions page-actions";
    actions.hidden = true;
    for (const [what, text] of [["copy", "Copy"], ["md", ".md"], ["txt", ".txt"], ["json", ".json"]]) {
      const button = actions.appendChild(document.createElement("button"));
      button.type = "button";
      button.className = "small";
      button.dataset.page = what;
      button.textContent = text;
    }
    const sheet = section.appendChild(document.createElement("div"));
    sheet.className = "sheet pending";
    const right = section.appendChild(document.createElement("div"));
    right.className = "text";
    right.appendChild(document.createElement("div")).className = "md";
    const details = right.appendChild(document.createElement("details"));
    details.className = "source";
    details.appendChild(document.createElement("summary")).textContent = "Markdown source";
    details.appendChild(document.createElement("pre")).className = "md-source";
    const later = [...$("pages").children].find((s) => Number(s.dataset.page) > n);
    $("pages").insertBefore(section, later || null);

    const thumb = document.createElement("button");
    thumb.type = "button";
    thumb.className = "thumb";
    thumb.dataset.page = n;
    thumb.title = label;
    thumb.appendChild(document.createElement("span")).textContent = String(n);
    thumb.addEventListener("click", () => goTo(n));
    const laterThumb = [...$("strip").children].find((t) => Number(t.dataset.page) > n);
    $("strip").insertBefore(thumb, laterThumb || null);
    $("strip").hidden = $("strip").children.length < 2;
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

  async function showPage(current, event) {
    const n = event.page !== undefined ? event.page : event.index;
    const section = pageSection(current, n, event.page !== undefined ? "Page " + n : event.file || "Image");
    const state = current.pages.get(n);
    state.final = true;
    state.markdown = event.markdown || "";
    setStatus(section.querySelector("h2 .status"), event.status);
    showMarkdown(section, event.markdown, event.error);
    if (event.status === "failed") { section.querySelector(".sheet").classList.remove("pending"); return; }
    try {
      const base = "jobs/" + current.job.id + "/pages/" + n;
      state.json = await (await api(base, { signal: current.abort.signal })).json();
      showMarkdown(section, state.json.markdown, null);
      state.markdown = state.json.markdown;
      section.querySelector(".page-actions").hidden = false;
      if (current.job.kind === "pdf") {
        const blob = await (await api(base + "/image", { signal: current.abort.signal })).blob();
        state.image = URL.createObjectURL(blob);
      } else if (current.job.urls) state.image = current.job.urls[n];
      drawSheet(section, state);
    } catch (error) {
      if (error.name !== "AbortError") say("Page " + n + ": " + error.message, "error");
    }
  }

  /* Boxes from the page's blocks (PDF pages), or parsed from the raw output's grounding tags (images, whose
   * page answer lists no blocks): [label, [x1, y1, x2, y2] on the 0..999 grid, the block's text if known]. */
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

  function drawSheet(section, state) {
    const sheet = section.querySelector(".sheet");
    sheet.replaceChildren();
    sheet.classList.remove("pending");
    const page = state.json;
    if (state.image) {
      const img = sheet.appendChild(document.createElement("img"));
      img.src = state.image;
      img.alt = state.label;
      const thumb = $("strip").querySelector('.thumb[data-page="' + section.dataset.page + '"]');
      if (thumb && !thumb.querySelector("img")) thumb.prepend(Object.assign(document.createElement("img"),
        { src: state.image, alt: "" }));
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

  /* ---- the page strip and the arrow keys ---- */

  function goTo(n) {
    const section = $("page-" + n);
    if (!section) return;
    section.scrollIntoView({ block: "start" });
    for (const t of $("strip").children) t.classList.toggle("current", t.dataset.page === String(n));
    const thumb = $("strip").querySelector('.thumb[data-page="' + n + '"]');
    if (thumb) thumb.scrollIntoView({ block: "nearest", inline: "nearest" });
  }

  document.addEventListener("keydown", (e) => {
    if (!view || e.altKey || e.ctrlKey || e.metaKey || /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName)) return;
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
    const numbers = [...$("strip").children].map((t) => Number(t.dataset.page));
    if (!numbers.length) return;
    const currentThumb = $("strip").querySelector(".thumb.current");
    const at = currentThumb ? numbers.indexOf(Number(currentThumb.dataset.page)) : -1;
    const next = Math.max(0, Math.min(numbers.length - 1, at + (e.key === "ArrowRight" ? 1 : -1)));
    e.preventDefault();
    goTo(numbers[next]);
  });

  /* ---- copy and downloads ---- */

  function plainOf(section) { return section.querySelector(".md").innerText.trim() + "\n"; }

  $("pages").addEventListener("click", async (e) => {
    const button = e.target.closest("button[data-page]");
    if (!button || !view) return;
    const section = button.closest(".page");
    const n = Number(section.dataset.page);
    const state = view.pages.get(n);
    const name = stemOf(view.job.name || view.job.filename) + "_" + (view.job.kind === "pdf" ? "p" + n : n);
    const what = button.dataset.page;
    if (what === "copy") flash(button, await files.copy(state.markdown || ""));
    else if (what === "md") files.save(new Blob([state.markdown || ""], { type: "text/markdown" }), name + ".md");
    else if (what === "txt") files.save(new Blob([plainOf(section)], { type: "text/plain" }), name + ".txt");
    else if (what === "json") {
      files.save(new Blob([JSON.stringify(state.json, null, 2)], { type: "application/json" }), name + ".json");
    }
  });

  function flash(button, ok) {
    const text = button.textContent;
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = text; }, 1500);
  }

  async function documentMarkdown(job) {
    const result = await (await api("jobs/" + job.id + "/result")).json();
    const markdown = job.kind === "pdf" ? result.markdown
      : result.results.map((r) => "<!-- " + r.filename + " -->\n\n" + r.markdown).join("\n\n");
    return { result: result, markdown: markdown };
  }

  $("doc-actions").addEventListener("click", async (e) => {
    const button = e.target.closest("button[data-doc]");
    if (!button || !view) return;
    const job = view.job;
    const stem = stemOf(job.name || job.filename);
    try {
      const what = button.dataset.doc;
      if (what === "zip" || what === "searchable") {
        const response = await api("jobs/" + job.id + "/download");
        const zip = await response.blob();
        if (what === "zip") return files.save(zip, files.filenameOf(response.headers.get("Content-Disposition"),
          stem + ".zip"));
        const pdf = await files.zipMember(zip, (name) => name.endsWith("_searchable.pdf"), "application/pdf");
        if (!pdf) return say("This job's ZIP has no searchable PDF.", "error");
        return files.save(pdf, stem + "_searchable.pdf");
      }
      if (what === "txt") {
        const text = [...$("pages").querySelectorAll(".page")].map(plainOf).join("\n");
        return files.save(new Blob([text], { type: "text/plain" }), stem + ".txt");
      }
      const { result, markdown } = await documentMarkdown(job);
      if (what === "copy") flash(button, await files.copy(markdown));
      else if (what === "md") files.save(new Blob([markdown], { type: "text/markdown" }), stem + ".md");
      else if (what === "json") {
        files.save(new Blob([JSON.stringify(result, null, 2)], { type: "application/json" }), stem + ".json");
      }
    } catch (error) {
      say(button.textContent + ": " + error.message, error.key ? "key" : "error");
    }
  });

  $("cancel").addEventListener("click", async () => {
    if (!view) return;
    try { await api("jobs/" + view.job.id, { method: "DELETE" }); } catch (error) { say(error.message, "error"); }
  });

  /* ---- choosing and dropping ---- */

  $("file").addEventListener("change", (e) => {
    if (e.target.files.length) submit(e.target.files);
    e.target.value = "";
  });
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) submit(e.dataTransfer.files);
  });
  $("refresh").addEventListener("click", refreshQueue);

  /* A new key: read the server's options and the jobs again (a typed key has no Enter to wait for). */
  let keyTimer = null;
  keyInput.addEventListener("input", () => {
    sessionStorage.setItem(KEY, keyInput.value);
    clearTimeout(keyTimer);
    keyTimer = setTimeout(() => {
      if ($("message").dataset.kind === "key") say(""); // a key message is answered again below; others stay
      loadInfo();
      refreshQueue();
    }, 400);
  });

  loadInfo();
  refreshQueue().then(() => {
    const wanted = /^#job=([\w-]+)$/.exec(location.hash);
    if (wanted && jobs.has(wanted[1]) && !view) show(jobs.get(wanted[1]));
  });
})();
