// Markdown to DOM nodes for the chat page: code blocks (with a Copy button), headings, lists, tables,
// block quotes, rules, and inline code, strong, emphasis, strike-through and links.
//
// Model text is data: it only ever becomes text nodes (`append(string)`, `textContent`) inside
// elements created here, never HTML, so no tag or attribute in an answer is interpreted. Links keep
// http(s) and mailto targets only (anything else stays text); images are shown as their alt text and
// never loaded. Rendering a partial answer (while it streams) gives the same blocks so far: an
// unclosed code fence is a code block up to the end.
"use strict";

const Markdown = (() => {
  const SAFE_LINK = /^(https?:\/\/|mailto:)/i;
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
  const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_DIVIDER = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  // Inline spans, tried left to right: `code`, ![image](src), [link](href), **strong**, __strong__,
  // *em*, _em_ (not inside words: snake_case stays text), ~~deleted~~.
  const INLINE = new RegExp(
    [
      /(`+)(.+?)\1(?!`)/,
      /!\[([^\]]*)\]\([^)]*\)/,
      /\[([^\]]+)\]\(\s*([^)\s]+)\s*\)/,
      /\*\*(?=\S)(.+?)\*\*/,
      /(?<![\w])__(?=\S)(.+?)__(?![\w])/,
      /\*(?=[^\s*])(.+?)\*/,
      /(?<![\w])_(?=[^\s_])(.+?)_(?![\w])/,
      /~~(?=\S)(.+?)~~/,
    ]
      .map((part) => part.source)
      .join("|"),
    "g"
  );

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function inline(text, parent) {
    let last = 0;
    for (const match of text.matchAll(INLINE)) {
      parent.append(text.slice(last, match.index));
      last = match.index + match[0].length;
      const [, ticks, code, alt, label, href, strong, strong2, em, em2, deleted] = match;
      if (ticks) parent.append(element("code", null, code.length > 2 && code.startsWith(" ") && code.endsWith(" ") ? code.slice(1, -1) : code));
      else if (alt !== undefined) parent.append(alt);
      else if (label !== undefined) {
        if (!SAFE_LINK.test(href)) { parent.append(match[0]); continue; }
        const link = element("a");
        link.href = href;
        link.rel = "noopener noreferrer nofollow";
        link.target = "_blank";
        inline(label, link);
        parent.append(link);
      } else if (strong !== undefined || strong2 !== undefined) inline(strong ?? strong2, parent.appendChild(element("strong")));
      else if (em !== undefined || em2 !== undefined) inline(em ?? em2, parent.appendChild(element("em")));
      else inline(deleted, parent.appendChild(element("del")));
    }
    parent.append(text.slice(last));
  }

  function copy(text, button) {
    const done = (label) => { button.textContent = label; setTimeout(() => { button.textContent = "Copy"; }, 1500); };
    const fallback = () => {
      const area = element("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      const copied = document.execCommand("copy");
      area.remove();
      done(copied ? "Copied" : "Copy failed");
    };
    if (navigator.clipboard) navigator.clipboard.writeText(text).then(() => done("Copied"), fallback);
    else fallback();
  }

  function codeBlock(code, language) {
    const block = element("div", "code-block");
    const bar = element("div", "code-bar");
    const button = element("button", "copy", "Copy");
    button.type = "button";
    button.addEventListener("click", () => copy(code, button));
    bar.append(element("span", "language", language || ""), button);
    const pre = element("pre");
    pre.append(element("code", null, code));
    block.append(bar, pre);
    return block;
  }

  function cells(line) {
    let text = line.trim();
    if (text.startsWith("|")) text = text.slice(1);
    if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
    return text.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
  }

  function table(lines, start) {
    const node = element("table");
    const head = node.appendChild(element("thead")).appendChild(element("tr"));
    const columns = cells(lines[start]);
    for (const cell of columns) inline(cell, head.appendChild(element("th")));
    const body = node.appendChild(element("tbody"));
    let index = start + 2;
    for (; index < lines.length && lines[index].includes("|") && lines[index].trim(); index++) {
      const row = body.appendChild(element("tr"));
      const values = cells(lines[index]);
      for (let column = 0; column < columns.length; column++) inline(values[column] ?? "", row.appendChild(element("td")));
    }
    return [node, index];
  }

  function startsBlock(lines, index) {
    const line = lines[index];
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line)
      || (line.includes("|") && index + 1 < lines.length && TABLE_DIVIDER.test(lines[index + 1]));
  }

  function list(lines, start) {
    const first = lines[start].match(ITEM);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const node = element(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    let index = start;
    while (index < lines.length) {
      const item = lines[index].match(ITEM);
      if (!item || item[1].length !== indent || /\d/.test(item[2]) !== ordered) break;
      const body = [item[3]];
      index++;
      // The item goes on over lines indented past its marker, and over lazy continuation lines.
      while (index < lines.length) {
        const line = lines[index];
        const nested = line.match(ITEM);
        if (!line.trim()) {
          if (index + 1 < lines.length && /^\s+\S/.test(lines[index + 1]) && lines[index + 1].search(/\S/) > indent) { body.push(""); index++; continue; }
          break;
        }
        if (nested ? nested[1].length > indent : (/^\s/.test(line) || !startsBlock(lines, index))) {
          body.push(line.slice(Math.min(line.search(/\S/), indent + 2)));
          index++;
          continue;
        }
        break;
      }
      const li = node.appendChild(element("li"));
      if (body.length === 1) inline(body[0], li);
      else li.append(render(body.join("\n")));
      if (index < lines.length && !lines[index].trim()) index++;
    }
    return [node, index];
  }

  // A DocumentFragment with the blocks of `source`.
  function render(source) {
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    const out = document.createDocumentFragment();
    let index = 0;
    while (index < lines.length) {
      const line = lines[index];
      let match;
      if (!line.trim()) { index++; continue; }
      if ((match = line.match(FENCE))) {
        const body = [];
        for (index++; index < lines.length && !lines[index].trim().startsWith(match[1]); index++) body.push(lines[index]);
        index++;  // the closing fence, or past the end of a code block still being written
        out.append(codeBlock(body.join("\n"), match[2]));
      } else if ((match = line.match(HEADING))) {
        inline(match[2], out.appendChild(element("h" + match[1].length)));
        index++;
      } else if (RULE.test(line)) {
        out.append(element("hr"));
        index++;
      } else if (QUOTE.test(line)) {
        const body = [];
        for (; index < lines.length && (match = lines[index].match(QUOTE)); index++) body.push(match[1]);
        out.appendChild(element("blockquote")).append(render(body.join("\n")));
      } else if (ITEM.test(line)) {
        const [node, next] = list(lines, index);
        out.append(node);
        index = next;
      } else if (line.includes("|") && index + 1 < lines.length && TABLE_DIVIDER.test(lines[index + 1])) {
        const [node, next] = table(lines, index);
        out.append(node);
        index = next;
      } else {
        const paragraph = out.appendChild(element("p"));
        inline(line, paragraph);
        for (index++; index < lines.length && lines[index].trim() && !startsBlock(lines, index); index++) {
          paragraph.append(element("br"));
          inline(lines[index], paragraph);
        }
      }
    }
    return out;
  }

  return {render};
})();
