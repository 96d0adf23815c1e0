/* Saving and copying for the /ui page, and one member read out of a ZIP.
 * A plain <a href> could not send the API key, so every file is fetched as a blob and saved through an object URL.
 * The searchable PDF of a job lives only in its ZIP (`GET /jobs/{id}/download`): rather than a route of its own,
 * the page reads that member from the ZIP's central directory and inflates it with the browser's own
 * DecompressionStream, so no library (and no CDN) is needed. */
(function () {
  "use strict";

  function save(blob, name) {
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = name;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  /* The clipboard API needs a secure context and (headless) a permission; the hidden textarea keeps the last
   * copied text either way and is the fallback when the API is refused. */
  async function copy(text) {
    const area = document.getElementById("clipboard");
    area.value = text;
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (_) {
      area.select();
      try { return document.execCommand("copy"); } catch (__) { return false; }
    }
  }

  function filenameOf(disposition, fallback) {
    const star = /filename\*=UTF-8''([^;]+)/i.exec(disposition || "");
    if (star) return decodeURIComponent(star[1]);
    const plain = /filename="?([^";]+)"?/i.exec(disposition || "");
    return plain ? plain[1] : fallback;
  }

  /* The first member whose name passes `wanted`, as a Blob, or null. Handles stored and deflated members of a
   * ZIP without ZIP64 (a job's ZIP over 4 GB is refused here with a message, not misread). */
  async function zipMember(blob, wanted, type) {
    const bytes = new Uint8Array(await blob.arrayBuffer());
    const view = new DataView(bytes.buffer);
    let end = -1;
    for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 22 - 65535); i--) {
      if (view.getUint32(i, true) === 0x06054b50) { end = i; break; }
    }
    if (end < 0) throw new Error("the download is not a ZIP");
    const count = view.getUint16(end + 10, true);
    let at = view.getUint32(end + 16, true);
    if (at === 0xffffffff) throw new Error("the ZIP is too large to open in the page; download the ZIP");
    const decoder = new TextDecoder();
    for (let n = 0; n < count; n++) {
      if (view.getUint32(at, true) !== 0x02014b50) throw new Error("the ZIP's directory is damaged");
      const method = view.getUint16(at + 10, true);
      const size = view.getUint32(at + 20, true);
      const nameLength = view.getUint16(at + 28, true);
      const skip = nameLength + view.getUint16(at + 30, true) + view.getUint16(at + 32, true);
      const local = view.getUint32(at + 42, true);
      const name = decoder.decode(bytes.subarray(at + 46, at + 46 + nameLength));
      at += 46 + skip;
      if (!wanted(name)) continue;
      const start = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
      const data = bytes.subarray(start, start + size);
      if (method === 0) return new Blob([data], { type: type });
      if (method !== 8) throw new Error("ZIP member " + name + " uses an unknown compression (" + method + ")");
      const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
      return new Blob([await new Response(stream).arrayBuffer()], { type: type });
    }
    return null;
  }

  window.ocrFiles = { save: save, copy: copy, filenameOf: filenameOf, zipMember: zipMember };
})();
