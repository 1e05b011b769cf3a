// A strict well-formedness check. xmlbuilder2's parser is lenient: it accepts `<a></b>`,
// unclosed elements, and treats a string without `<` as an element NAME. Domain XML we are
// about to rewrite and hand to libvirt must be rejected before that, with a clear message.

/** Throws an Error naming the problem and its offset when `xml` is not one well-formed element tree. */
export function checkWellFormed(xml: string): void {
  const s = xml.charCodeAt(0) === 0xfeff ? xml.slice(1) : xml;
  const stack: string[] = [];
  let roots = 0;
  let i = 0;
  const skipTo = (end: string, what: string) => {
    const j = s.indexOf(end, i);
    if (j < 0) throw new Error(`unterminated ${what} at offset ${i}`);
    i = j + end.length;
  };
  while (i < s.length) {
    const lt = s.indexOf('<', i);
    const text = s.slice(i, lt < 0 ? s.length : lt);
    if (stack.length === 0 && text.trim() !== '') throw new Error(`text outside the root element at offset ${i}: ${JSON.stringify(text.trim().slice(0, 30))}`);
    if (lt < 0) break;
    i = lt;
    if (s.startsWith('<!--', i)) { skipTo('-->', 'comment'); continue; }
    if (s.startsWith('<![CDATA[', i)) {
      if (stack.length === 0) throw new Error(`CDATA outside the root element at offset ${i}`);
      skipTo(']]>', 'CDATA section');
      continue;
    }
    if (s.startsWith('<?', i)) { skipTo('?>', 'processing instruction'); continue; }
    if (s.startsWith('<!', i)) { skipTo('>', 'declaration'); continue; }
    const closing = s[i + 1] === '/';
    const m = /^[A-Za-z_][\w.:-]*/.exec(s.slice(i + (closing ? 2 : 1), i + 300));
    if (!m) throw new Error(`bad tag at offset ${i}: ${JSON.stringify(s.slice(i, i + 20))}`);
    const name = m[0];
    let j = i + (closing ? 2 : 1) + name.length;
    // Scan attributes, honouring quotes, to the end of the tag.
    let quote = '';
    for (; j < s.length; j++) {
      const c = s[j]!;
      if (quote) { if (c === quote) quote = ''; continue; }
      if (c === '"' || c === "'") quote = c;
      else if (c === '<') throw new Error(`'<' inside the tag <${name}> at offset ${j}`);
      else if (c === '>') break;
    }
    if (j >= s.length) throw new Error(`unterminated tag <${name}> at offset ${i}`);
    const selfClosing = !closing && s[j - 1] === '/';
    if (closing) {
      const open = stack.pop();
      if (open !== name) throw new Error(`</${name}> at offset ${i} closes ${open ? `<${open}>` : 'nothing'}`);
    } else if (!selfClosing) {
      if (stack.length === 0) roots++;
      stack.push(name);
    } else if (stack.length === 0) {
      roots++;
    }
    if (roots > 1) throw new Error(`a second root element <${name}> at offset ${i}`);
    i = j + 1;
  }
  if (stack.length) throw new Error(`<${stack.at(-1)}> is never closed`);
  if (roots === 0) throw new Error('no root element');
}
