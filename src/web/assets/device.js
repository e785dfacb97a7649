// The device page: status, latest values, one live line chart per numeric metric
// over the last 5, 15 or 60 minutes (history from the readings API merged with the
// live stream; history is fetched again whenever the stream had to start over), and
// the commands: a form to send one (name + params JSON) and the recent ones with
// their state and reply, kept current by the live stream's `command` events.

import { ApiError } from './api.js';
import { LineChart, formatValue } from './chart.js';
import { ago, badge, el, labelChips, parseTime } from './dom.js';
import { LiveStream } from './live.js';

const WINDOWS_MIN = [5, 15, 60];
const TARGET_POINTS = 300;
const NICE_STEPS_MS = [1e3, 2e3, 5e3, 10e3, 15e3, 30e3, 60e3];
const REFRESH_MS = 20_000;
// Commands shown on the page (the newest).
const MAX_COMMANDS_SHOWN = 20;

// A command's states in life order (a row never moves back).
const COMMAND_STATES = ['queued', 'sent', 'delivered', 'replied', 'failed', 'expired', 'cancelled'];

// The chosen window survives navigation between devices (not reloads).
let windowMin = 15;

/** The bucket width giving a chart about TARGET_POINTS points over the window. */
export function stepFor(windowMs) {
  const raw = windowMs / TARGET_POINTS;
  return NICE_STEPS_MS.find((s) => s >= raw) || NICE_STEPS_MS[NICE_STEPS_MS.length - 1];
}

/**
 * @param {import('./api.js').Api} api
 * @param {HTMLElement} view
 * @param {string} id
 * @param {(state: string) => void} onConn
 */
export function devicePage(api, view, id, onConn) {
  const metrics = new Map(); // name -> {ts, value, card, valueEl, tsEl, chart?}
  let device = null;
  let live = null;
  let stopped = false;
  let lastSeen = NaN;
  let online = false;
  let infoTimer = 0;
  const aborter = new AbortController();

  const title = el('h1', { class: 'device-title', text: id });
  const subtitle = el('p', { class: 'device-sub' });
  const status = el('span', { class: 'status' });
  const seen = el('span', { class: 'seen' });
  const labels = el('div', { class: 'labels' });
  const error = el('p', { class: 'notice notice-error', hidden: true, attrs: { role: 'alert' } });
  const info = el('p', { class: 'notice', hidden: true, attrs: { role: 'status' } });
  const cards = el('div', { class: 'cards', id: 'metric-cards' });
  const charts = el('div', { class: 'charts', id: 'charts' });
  const windowButtons = WINDOWS_MIN.map((m) =>
    el('button', {
      class: 'seg',
      type: 'button',
      text: `${m} min`,
      data: { window: String(m) },
      attrs: { 'aria-pressed': String(m === windowMin) },
      on: { click: () => setWindow(m) },
    }),
  );
  const empty = el('p', { class: 'empty', text: 'No readings yet. Values appear here as soon as the device sends.' });
  const commands = new Map(); // id -> {row, stateEl, replyEl}
  const commandName = el('input', {
    id: 'command-name',
    type: 'text',
    required: true,
    placeholder: 'set_period',
    attrs: { 'aria-label': 'Command name', autocomplete: 'off' },
  });
  const commandParams = el('textarea', {
    id: 'command-params',
    rows: 2,
    placeholder: '{"period_ms": 1000}',
    attrs: { 'aria-label': 'Parameters (JSON object)', spellcheck: 'false' },
  });
  const commandError = el('p', { class: 'notice notice-error', id: 'command-error', hidden: true, attrs: { role: 'alert' } });
  const commandRows = el('tbody', { id: 'command-rows' });
  const commandForm = el(
    'form',
    { class: 'command-form', id: 'command-form', on: { submit: (e) => sendCommand(e) } },
    commandName,
    commandParams,
    el('button', { type: 'submit', class: 'btn btn-primary', text: 'Send' }),
  );
  const commandSection = el(
    'section',
    { class: 'commands', id: 'commands' },
    el('h2', { text: 'Commands' }),
    commandForm,
    commandError,
    el(
      'table',
      { class: 'command-table' },
      el('thead', {}, el('tr', {}, el('th', { text: 'Command' }), el('th', { text: 'State' }), el('th', { text: 'Reply' }))),
      commandRows,
    ),
  );
  view.replaceChildren(
    el('a', { class: 'back', href: '#/', text: '← Devices' }),
    el('div', { class: 'page-head' }, el('div', {}, title, subtitle), el('div', { class: 'device-state' }, status, seen)),
    labels,
    error,
    info,
    cards,
    empty,
    el(
      'div',
      { class: 'charts-head' },
      el('h2', { text: 'Charts' }),
      el('div', { class: 'segmented', attrs: { role: 'group', 'aria-label': 'Time window' } }, ...windowButtons),
    ),
    charts,
    commandSection,
  );

  /** Show a command (new or changed): its row says name, state and reply or error. */
  function showCommand(c) {
    let entry = commands.get(c.id);
    if (!entry) {
      const stateEl = el('td', { class: 'command-state' });
      const replyEl = el('td', { class: 'command-reply' });
      const row = el('tr', { data: { command: c.id } }, el('td', { class: 'command-name', text: c.name }), stateEl, replyEl);
      entry = { row, stateEl, replyEl, rank: 0 };
      commands.set(c.id, entry);
      commandRows.prepend(row);
      while (commandRows.children.length > MAX_COMMANDS_SHOWN) {
        const last = commandRows.lastElementChild;
        commands.delete(last.dataset.command);
        last.remove();
      }
    }
    // Events and answers may arrive out of order: a state never goes back.
    const rank = COMMAND_STATES.indexOf(c.state);
    if (rank < entry.rank) return;
    entry.rank = rank;
    entry.stateEl.textContent = c.state;
    entry.row.dataset.state = c.state;
    if (c.error !== undefined && c.error !== null) entry.replyEl.textContent = c.error;
    else if (c.result !== undefined && c.result !== null) entry.replyEl.textContent = JSON.stringify(c.result);
  }

  async function sendCommand(e) {
    e.preventDefault();
    commandError.hidden = true;
    let params = {};
    const text = commandParams.value.trim();
    if (text) {
      try {
        params = JSON.parse(text);
      } catch {
        params = null;
      }
      if (!params || typeof params !== 'object' || Array.isArray(params)) {
        commandError.textContent = 'Parameters must be a JSON object, e.g. {"period_ms": 1000}.';
        commandError.hidden = false;
        return;
      }
    }
    try {
      showCommand(await api.sendCommand(id, commandName.value.trim(), params));
    } catch (err) {
      commandError.textContent = `The command was not sent: ${describe(err)}`;
      commandError.hidden = false;
    }
  }

  async function loadCommands() {
    try {
      const page = await api.listCommands(id, aborter.signal);
      if (stopped) return;
      for (const c of (page.commands || []).slice(-MAX_COMMANDS_SHOWN)) showCommand(c);
    } catch (err) {
      if (err.name !== 'AbortError' && !stopped) showError(describe(err));
    }
  }

  function showError(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  function renderStatus() {
    status.replaceChildren(badge(online));
    seen.textContent = `last seen ${ago(lastSeen)}`;
  }

  function renderDevice(d) {
    device = d;
    title.textContent = d.name || d.id;
    subtitle.textContent = d.name && d.name !== d.id ? d.id : '';
    if (!d.enabled) subtitle.textContent += `${subtitle.textContent ? ' · ' : ''}disabled`;
    const t = parseTime(d.last_seen);
    if (Number.isFinite(t) && !(lastSeen > t)) lastSeen = t;
    online = d.online;
    labels.replaceChildren(labelChips(d.labels));
    renderStatus();
    document.title = `${d.name || d.id} · fluxgate`;
  }

  function metricEntry(name, value) {
    let m = metrics.get(name);
    if (m) return m;
    const valueEl = el('span', { class: 'metric-value' });
    const tsEl = el('span', { class: 'metric-ts' });
    const card = el('div', { class: 'metric-card', data: { metric: name } }, el('span', { class: 'metric-name', text: name }), valueEl, tsEl);
    m = { ts: -Infinity, value: null, card, valueEl, tsEl, chart: null };
    metrics.set(name, m);
    // Cards in name order, so values do not jump around as metrics appear.
    const after = [...cards.children].find((c) => c.dataset.metric > name);
    cards.insertBefore(card, after || null);
    empty.hidden = true;
    if (typeof value === 'number') addChart(name, m);
    return m;
  }

  function addChart(name, m) {
    const chartValue = el('span', { class: 'chart-value' });
    const box = el('div', { class: 'chart-box' });
    const section = el(
      'section',
      { class: 'chart-card', data: { metric: name } },
      el('div', { class: 'chart-head' }, el('h3', { text: name }), chartValue),
      box,
    );
    const after = [...charts.children].find((c) => c.dataset.metric > name);
    charts.insertBefore(section, after || null);
    const windowMs = windowMin * 60e3;
    m.chart = new LineChart(box, { windowMs, gapMs: gapFor(windowMs) });
    m.chart.setLabel(`${name} over the last ${windowMin} minutes`);
    m.chartValue = chartValue;
    loadHistory(name);
  }

  function gapFor(windowMs) {
    // Break the line only where data is clearly missing, not between sparse buckets.
    return Math.max(3 * stepFor(windowMs), 30e3);
  }

  /** Apply one reading: the card shows the newest value; the chart gets every point. */
  function apply(r, fromLive) {
    const m = metricEntry(r.metric, r.value);
    if (r.ts >= m.ts) {
      m.ts = r.ts;
      m.value = r.value;
      m.valueEl.textContent = formatValue(r.value);
      m.tsEl.textContent = ago(r.ts);
      if (m.chartValue) m.chartValue.textContent = formatValue(r.value);
    }
    if (m.chart && typeof r.value === 'number') m.chart.add(r.ts, r.value);
    if (fromLive) {
      online = true;
      lastSeen = Date.now();
    }
  }

  async function loadHistory(name) {
    const m = metrics.get(name);
    if (!m || !m.chart) return;
    const windowMs = windowMin * 60e3;
    const step = stepFor(windowMs);
    const to = Date.now() + 1000;
    const from = to - windowMs - step;
    try {
      const res = await api.readings(id, name, from, to, step, aborter.signal);
      if (stopped || !m.chart) return;
      const pts = (res.points || []).filter((p) => typeof p.value === 'number').map((p) => [p.ts, p.value]);
      // Replace only what the history covers: live points newer than its last bucket
      // (possibly not yet in the store) stay.
      if (pts.length) m.chart.replaceRange(from, pts[pts.length - 1][0] + step, pts);
    } catch (e) {
      if (e.name !== 'AbortError' && !stopped) showError(`History of ${name}: ${describe(e)}`);
    }
  }

  function reloadHistory() {
    for (const name of metrics.keys()) loadHistory(name);
  }

  function setWindow(min) {
    windowMin = min;
    for (const b of windowButtons) b.setAttribute('aria-pressed', String(Number(b.dataset.window) === min));
    const windowMs = min * 60e3;
    for (const [name, m] of metrics) {
      if (!m.chart) continue;
      m.chart.windowMs = windowMs;
      m.chart.gapMs = gapFor(windowMs);
      m.chart.setLabel(`${name} over the last ${min} minutes`);
      m.chart.replaceRange(-Infinity, Infinity, []);
    }
    reloadHistory();
  }

  function describe(e) {
    if (e instanceof ApiError && e.status === 0) return 'the gateway is not reachable';
    return e.message;
  }

  function startLive() {
    let first = true;
    live = new LiveStream(api, { devices: [id] }, {
      onSnapshot: (readings, { fresh }) => {
        for (const r of readings) if (r.device === id) apply(r, false);
        // A fresh snapshot after the first means the stream started over (gateway
        // restart or reset): readings in between may be missing, so refetch history.
        if (fresh && !first) {
          reloadHistory();
          refreshDevice();
        }
        first = false;
        renderStatus();
      },
      onReadings: (readings) => {
        for (const r of readings) if (r.device === id) apply(r, true);
        renderStatus();
      },
      onGapfill: (readings) => {
        for (const r of readings) if (r.device === id) apply(r, false);
      },
      onReset: (reason) => {
        // Tell the operator why the chart was redrawn, then get out of the way.
        info.textContent = `The live stream started over: ${reason}. History was reloaded.`;
        info.hidden = false;
        clearTimeout(infoTimer);
        infoTimer = setTimeout(() => {
          info.hidden = true;
        }, 15_000);
      },
      onCommand: (c) => {
        if (c.device === id) showCommand(c);
      },
      onState: onConn,
    }).start();
  }

  async function refreshDevice() {
    try {
      renderDevice(await api.getDevice(id, aborter.signal));
      showError('');
    } catch (e) {
      if (e.name === 'AbortError' || stopped) return;
      if (e instanceof ApiError && e.status === 404) showError(`There is no device “${id}”.`);
      else showError(describe(e));
    }
  }

  async function load() {
    await refreshDevice();
    if (stopped || !device) return;
    try {
      const latest = await api.latest(id, aborter.signal);
      if (stopped) return;
      for (const [metric, v] of Object.entries((latest && latest.metrics) || {})) apply({ device: id, metric, ts: v.ts, value: v.value }, false);
    } catch (e) {
      if (e.name !== 'AbortError' && !stopped) showError(describe(e));
    }
    if (!stopped) startLive();
    if (!stopped) loadCommands();
  }

  const ticker = setInterval(() => {
    for (const m of metrics.values()) {
      m.tsEl.textContent = ago(m.ts);
      if (m.chart) m.chart.draw();
    }
    renderStatus();
  }, 1000);
  const refresher = setInterval(refreshDevice, REFRESH_MS);
  renderStatus();
  load();

  return {
    stop() {
      stopped = true;
      aborter.abort();
      clearInterval(ticker);
      clearInterval(refresher);
      clearTimeout(infoTimer);
      if (live) live.stop();
      for (const m of metrics.values()) if (m.chart) m.chart.destroy();
      document.title = 'fluxgate';
    },
  };
}
