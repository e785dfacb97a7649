// A small time-series line chart on a canvas: time axis over a sliding window, a value
// axis with "nice" ticks, gaps where data is missing, and a hover read-out. Colours come
// from CSS custom properties so the chart follows the page's light/dark theme.

const MARGIN = { left: 52, right: 14, top: 12, bottom: 26 };
const TIME_STEPS = [5e3, 10e3, 15e3, 30e3, 60e3, 120e3, 300e3, 600e3, 900e3, 1800e3, 3600e3];

export class LineChart {
  /**
   * @param {HTMLElement} container gets a canvas filling its width
   * @param {{windowMs: number, gapMs: number}} options
   */
  constructor(container, { windowMs, gapMs }) {
    this.container = container;
    this.windowMs = windowMs;
    this.gapMs = gapMs;
    this.points = []; // [ts, value], sorted by ts, one per ts
    this.hoverX = null;
    this.frame = 0;
    this.canvas = document.createElement('canvas');
    this.canvas.className = 'chart-canvas';
    this.canvas.setAttribute('role', 'img');
    container.append(this.canvas);
    // The plotted points are reachable from the element, so the end-to-end test (and
    // anyone in devtools) can check what the chart holds rather than how it looks.
    this.canvas.lineChart = this;
    this.resizer = new ResizeObserver(() => this.draw());
    this.resizer.observe(container);
    this.canvas.addEventListener('pointermove', (e) => {
      this.hoverX = e.offsetX;
      this.draw();
    });
    this.canvas.addEventListener('pointerleave', () => {
      this.hoverX = null;
      this.draw();
    });
  }

  destroy() {
    this.resizer.disconnect();
    cancelAnimationFrame(this.frame);
    this.canvas.remove();
  }

  setLabel(text) {
    this.canvas.setAttribute('aria-label', text);
  }

  /** Replace every point in [from, to) with `points` (a history answer). */
  replaceRange(fromMs, toMs, points) {
    const kept = this.points.filter(([ts]) => ts < fromMs || ts >= toMs);
    for (const p of points) kept.push(p);
    kept.sort((a, b) => a[0] - b[0]);
    this.points = dedupe(kept);
    this.draw();
  }

  /** Add or overwrite the point at `ts` (applying a reading twice changes nothing). */
  add(ts, value) {
    const pts = this.points;
    if (!pts.length || ts > pts[pts.length - 1][0]) {
      pts.push([ts, value]);
    } else {
      let lo = 0;
      let hi = pts.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (pts[mid][0] < ts) lo = mid + 1;
        else hi = mid;
      }
      if (pts[lo] && pts[lo][0] === ts) pts[lo][1] = value;
      else pts.splice(lo, 0, [ts, value]);
    }
    this.draw();
  }

  /** Redraw on the next frame (many updates in one frame draw once). */
  draw() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  render() {
    const now = Date.now();
    const from = now - this.windowMs;
    // Keep one point before the window so the line enters from the left edge.
    let first = this.points.findIndex(([ts]) => ts >= from);
    if (first > 1) this.points.splice(0, first - 1);
    first = Math.max(0, this.points.findIndex(([ts]) => ts >= from) - 1);
    const pts = this.points.slice(first);

    const cssW = this.container.clientWidth;
    const cssH = this.canvas.clientHeight || 200;
    if (cssW === 0) return;
    const dpr = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(cssW * dpr) || this.canvas.height !== Math.round(cssH * dpr)) {
      this.canvas.width = Math.round(cssW * dpr);
      this.canvas.height = Math.round(cssH * dpr);
    }
    const ctx = this.canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    const style = getComputedStyle(this.container);
    const color = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
    const ink = color('--chart-ink', '#475569');
    const grid = color('--chart-grid', '#e2e8f0');
    const line = color('--chart-line', '#0f766e');
    ctx.font = '11px system-ui, sans-serif';

    const plotW = cssW - MARGIN.left - MARGIN.right;
    const plotH = cssH - MARGIN.top - MARGIN.bottom;
    const visible = pts.filter(([ts]) => ts >= from);
    const [lo, hi] = valueRange(visible.length ? visible : pts);
    const ticks = niceTicks(lo, hi, Math.max(2, Math.floor(plotH / 36)));
    const yMin = ticks[0];
    const yMax = ticks[ticks.length - 1];
    const x = (ts) => MARGIN.left + ((ts - from) / this.windowMs) * plotW;
    const y = (v) => MARGIN.top + plotH - ((v - yMin) / (yMax - yMin || 1)) * plotH;

    // Value grid and labels.
    ctx.strokeStyle = grid;
    ctx.fillStyle = ink;
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (const t of ticks) {
      const ty = Math.round(y(t)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(MARGIN.left, ty);
      ctx.lineTo(cssW - MARGIN.right, ty);
      ctx.stroke();
      ctx.fillText(formatNumber(t, ticks), MARGIN.left - 6, ty);
    }

    // Time ticks: the smallest step that leaves room for the labels.
    const labelW = 64;
    const step = TIME_STEPS.find((s) => (s / this.windowMs) * plotW >= labelW) || TIME_STEPS[TIME_STEPS.length - 1];
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    const tz = new Date().getTimezoneOffset() * 60e3;
    for (let t = Math.ceil((from - tz) / step) * step + tz; t <= now; t += step) {
      const tx = Math.round(x(t)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(tx, MARGIN.top);
      ctx.lineTo(tx, MARGIN.top + plotH);
      ctx.stroke();
      ctx.fillText(formatTime(t, step < 60e3), tx, MARGIN.top + plotH + 6);
    }

    // The series, clipped to the plot; a gap longer than `gapMs` breaks the line.
    ctx.save();
    ctx.beginPath();
    ctx.rect(MARGIN.left, MARGIN.top - 4, plotW, plotH + 8);
    ctx.clip();
    ctx.strokeStyle = line;
    ctx.lineWidth = 2;
    ctx.lineJoin = 'round';
    ctx.beginPath();
    let prev = null;
    for (const [ts, v] of pts) {
      if (prev === null || ts - prev > this.gapMs) ctx.moveTo(x(ts), y(v));
      else ctx.lineTo(x(ts), y(v));
      prev = ts;
    }
    ctx.stroke();
    if (pts.length) {
      const [ts, v] = pts[pts.length - 1];
      ctx.fillStyle = line;
      ctx.beginPath();
      ctx.arc(x(ts), y(v), 3.5, 0, Math.PI * 2);
      ctx.fill();
    }
    ctx.restore();

    if (!visible.length) {
      ctx.fillStyle = ink;
      ctx.textAlign = 'center';
      ctx.textBaseline = 'middle';
      ctx.fillText('no data in this window', MARGIN.left + plotW / 2, MARGIN.top + plotH / 2);
    }

    // Hover read-out: the point nearest to the pointer.
    if (this.hoverX !== null && visible.length) {
      let best = visible[0];
      for (const p of visible) if (Math.abs(x(p[0]) - this.hoverX) < Math.abs(x(best[0]) - this.hoverX)) best = p;
      const bx = x(best[0]);
      const by = y(best[1]);
      ctx.strokeStyle = ink;
      ctx.setLineDash([3, 3]);
      ctx.beginPath();
      ctx.moveTo(bx, MARGIN.top);
      ctx.lineTo(bx, MARGIN.top + plotH);
      ctx.stroke();
      ctx.setLineDash([]);
      const text = `${formatValue(best[1])}  ${formatTime(best[0], true)}`;
      const w = ctx.measureText(text).width + 12;
      const bxBox = Math.min(Math.max(bx - w / 2, MARGIN.left), cssW - MARGIN.right - w);
      ctx.fillStyle = color('--chart-tip-bg', '#0f172a');
      ctx.fillRect(bxBox, MARGIN.top, w, 20);
      ctx.fillStyle = color('--chart-tip-ink', '#ffffff');
      ctx.textAlign = 'left';
      ctx.textBaseline = 'middle';
      ctx.fillText(text, bxBox + 6, MARGIN.top + 10);
      ctx.fillStyle = line;
      ctx.beginPath();
      ctx.arc(bx, by, 4, 0, Math.PI * 2);
      ctx.fill();
    }
  }
}

function dedupe(sorted) {
  const out = [];
  for (const p of sorted) {
    if (out.length && out[out.length - 1][0] === p[0]) out[out.length - 1] = p;
    else out.push(p);
  }
  return out;
}

function valueRange(pts) {
  if (!pts.length) return [0, 1];
  let lo = Infinity;
  let hi = -Infinity;
  for (const [, v] of pts) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  if (lo === hi) {
    const pad = Math.abs(lo) * 0.05 || 1;
    return [lo - pad, hi + pad];
  }
  return [lo, hi];
}

/** Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten. */
export function niceTicks(lo, hi, count) {
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
  const start = Math.floor(lo / step) * step;
  const ticks = [];
  for (let t = start; t < hi + step * 0.999; t += step) ticks.push(Number(t.toPrecision(12)));
  if (ticks.length < 2) ticks.push(Number((start + step).toPrecision(12)));
  return ticks;
}

function formatNumber(v, ticks) {
  const step = Math.abs(ticks[1] - ticks[0]);
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step))));
  return v.toFixed(decimals);
}

/** A reading's value for display: numbers rounded to six significant digits. */
export function formatValue(v) {
  if (typeof v === 'number') {
    if (Number.isInteger(v)) return String(v);
    return String(Number(v.toPrecision(6)));
  }
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  return String(v);
}

function formatTime(ts, seconds) {
  const d = new Date(ts);
  const pad = (n) => String(n).padStart(2, '0');
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return seconds ? `${hm}:${pad(d.getSeconds())}` : hm;
}
