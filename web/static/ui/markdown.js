/* A small markdown renderer for the model's output, building DOM nodes (never innerHTML), so nothing the
 * model writes can become markup or script. It covers what DeepSeek-OCR writes: headings, paragraphs, lists,
 * fenced code, display math (shown as text), pipe tables and the HTML <table>s the model emits (rebuilt from an
 * inert parse keeping only table elements, their text and colspan/rowspan), emphasis, inline code, and figure
 * links (`![](images/1_0.jpg)`: the crops are in the ZIP, so they show as a labelled placeholder). */
(function () {
  "use strict";

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const INLINE = /(`[^`\n]+`)|(!\[[^\]\n]*\]\([^)\n]*\))|(\[[^\]\n]+\]\([^)\n]*\))|(\*\*[^*\n]+\*\*|__[^_\n]+__)|(\*[^*\s][^*\n]*\*)/g;

  function inline(parent, text) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      const t = m[0];
      if (m[1]) parent.append(el("code", "", t.slice(1, -1)));
      else if (m[2]) {
        const src = t.slice(t.indexOf("](") + 2, -1);
        parent.append(el("span", "figure", "figure " + src + " (in the ZIP)"));
      } else if (m[3]) {
        parent.append(el("span", "link", t.slice(1, t.indexOf("]("))));
      } else if (m[4]) inline(parent.appendChild(el("strong")), t.slice(2, -2));
      else inline(parent.appendChild(el("em")), t.slice(1, -1));
      last = m.index + t.length;
    }
    if (last < text.length) parent.append(text.slice(last));
    return parent;
  }

  const TABLE_TAGS = new Set(["TABLE", "THEAD", "TBODY", "TFOOT", "TR", "TD", "TH"]);

  /* The model's HTML table, parsed inertly (DOMParser runs no script, loads nothing) and copied element by
   * element: other tags are dropped but their text is kept. */
  function htmlTable(source) {
    const doc = new DOMParser().parseFromString(source, "text/html");
    const table = doc.querySelector("table");
    if (!table) return el("pre", "", source);
    function copy(node, into) {
      for (const child of node.childNodes) {
        if (child.nodeType === Node.TEXT_NODE) into.append(child.textContent);
        else if (child.nodeType === Node.ELEMENT_NODE && TABLE_TAGS.has(child.tagName)) {
          const clone = document.createElement(child.tagName.toLowerCase());
          for (const name of ["colspan", "rowspan"]) {
            const value = child.getAttribute(name);
            if (value && /^\d{1,3}$/.test(value)) clone.setAttribute(name, value);
          }
          into.append(clone);
          copy(child, clone);
        } else if (child.nodeType === Node.ELEMENT_NODE) copy(child, into);
      }
    }
    const out = el("table");
    copy(table, out);
    return out;
  }

  function cells(line) {
    return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  }

  function pipeTable(rows) {
    const table = el("table");
    const head = table.appendChild(el("thead")).appendChild(el("tr"));
    for (const c of cells(rows[0])) inline(head.appendChild(el("th")), c);
    const body = table.appendChild(el("tbody"));
    for (const row of rows.slice(2)) {
      const tr = body.appendChild(el("tr"));
      for (const c of cells(row)) inline(tr.appendChild(el("td")), c);
    }
    return table;
  }

  const HEADING = /^(#{1,6})\s+(.*)$/;
  const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const TABLE_SEP = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;

  function renderMarkdown(source) {
    const root = document.createDocumentFragment();
    const lines = String(source || "").replace(/\r\n?/g, "\n").split("\n");
    let para = [];
    let list = null;
    const flush = () => {
      if (para.length) inline(root.appendChild(el("p")), para.join(" "));
      para = [];
    };
    const endList = () => { list = null; };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const trimmed = line.trim();
      let m;
      if (!trimmed) { flush(); endList(); continue; }
      if (trimmed.startsWith("```")) {
        flush(); endList();
        const body = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith("```"); i++) body.push(lines[i]);
        root.appendChild(el("pre")).appendChild(el("code", "", body.join("\n")));
        continue;
      }
      if (trimmed === "\\[" || trimmed === "$$" || (trimmed.startsWith("\\[") && !trimmed.endsWith("\\]"))) {
        flush(); endList();
        const close = trimmed.startsWith("$$") ? "$$" : "\\]";
        const body = [line];
        for (i++; i < lines.length; i++) {
          body.push(lines[i]);
          if (lines[i].trim().endsWith(close)) break;
        }
        root.appendChild(el("pre", "math", body.join("\n")));
        continue;
      }
      if (/^<table[\s>]/i.test(trimmed)) {
        flush(); endList();
        const body = [line];
        while (!/<\/table>/i.test(body[body.length - 1]) && i + 1 < lines.length) body.push(lines[++i]);
        root.appendChild(htmlTable(body.join("\n")));
        continue;
      }
      if (trimmed.startsWith("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        flush(); endList();
        const rows = [line, lines[++i]];
        while (i + 1 < lines.length && lines[i + 1].trim().startsWith("|")) rows.push(lines[++i]);
        root.appendChild(pipeTable(rows));
        continue;
      }
      if ((m = HEADING.exec(trimmed))) {
        flush(); endList();
        inline(root.appendChild(el("h" + Math.min(m[1].length + 2, 6))), m[2]);
        continue;
      }
      if (RULE.test(trimmed)) { flush(); endList(); root.appendChild(el("hr")); continue; }
      if ((m = ITEM.exec(line))) {
        flush();
        const tag = /\d/.test(m[1]) ? "ol" : "ul";
        if (!list || list.tagName.toLowerCase() !== tag) list = root.appendChild(el(tag));
        inline(list.appendChild(el("li")), m[2]);
        continue;
      }
      endList();
      para.push(trimmed);
    }
    flush();
    return root;
  }

  window.renderMarkdown = renderMarkdown;
})();
