// DOM helpers. Every piece of data reaches the page as text (textContent or an
// attribute value), never as markup, so device names, labels and string readings
// cannot inject anything.

/**
 * Create an element. `props`: `class`, `data` (dataset entries), `text`, `attrs`
 * (attributes), `on` (event listeners), and any other DOM property (`href`, `type`…).
 * Children may be nodes, strings (added as text) or null (skipped).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k === 'data') Object.assign(node.dataset, v);
    else if (k === 'attrs') for (const [a, av] of Object.entries(v)) node.setAttribute(a, av);
    else if (k === 'on') for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** "just now", "12 s ago", "5 min ago", "3 h ago", or a date. */
export function ago(ms, now = Date.now()) {
  if (!Number.isFinite(ms)) return 'never';
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

/** An online/offline badge. */
export function badge(online) {
  return el('span', {
    class: `badge ${online ? 'badge-online' : 'badge-offline'}`,
    text: online ? 'online' : 'offline',
  });
}

/** `k=v` label chips. */
export function labelChips(labels) {
  const wrap = el('span', { class: 'chips' });
  for (const [k, v] of Object.entries(labels || {})) wrap.append(el('span', { class: 'chip', text: `${k}=${v}` }));
  return wrap;
}

/** Timestamp (ms) of an RFC 3339 string, or NaN. */
export function parseTime(rfc3339) {
  return typeof rfc3339 === 'string' ? Date.parse(rfc3339) : NaN;
}
