// The fleet page: devices with status, last seen, latest values and labels; a label
// filter; "load more" pagination; one live stream for all listed devices.

import { ApiError } from './api.js';
import { formatValue } from './chart.js';
import { ago, badge, el, labelChips, parseTime } from './dom.js';
import { LiveStream } from './live.js';

const PAGE = 50;
// The live stream's filter is bounded by the gateway (`live.max_filters`, 1000 by
// default); past this many listed devices the page stops streaming the newest ones.
const MAX_STREAMED = 500;
const REFRESH_MS = 20_000;

/**
 * @param {import('./api.js').Api} api
 * @param {HTMLElement} view
 * @param {{label: string}} query
 * @param {(state: string) => void} onConn
 */
export function fleetPage(api, view, query, onConn) {
  const rows = new Map(); // id -> {device, values: Map<metric,{ts,value}>, tr, cells}
  let cursor = null;
  let live = null;
  let stopped = false;
  const aborter = new AbortController();

  const input = el('input', {
    id: 'label-filter',
    type: 'search',
    name: 'label',
    value: query.label,
    placeholder: 'site=berlin',
    autocomplete: 'off',
    spellcheck: false,
    attrs: { 'aria-label': 'Label filter (key=value)' },
  });
  const form = el(
    'form',
    { class: 'filter', on: { submit: applyFilter } },
    el('label', { class: 'filter-label', htmlFor: 'label-filter', text: 'Label' }),
    input,
    el('button', { class: 'btn', type: 'submit', text: 'Filter' }),
    query.label ? el('a', { class: 'btn btn-quiet', href: '#/', text: 'Clear' }) : null,
  );
  const count = el('span', { class: 'count' });
  const error = el('p', { class: 'notice notice-error', hidden: true, attrs: { role: 'alert' } });
  const tbody = el('tbody');
  const table = el(
    'table',
    { class: 'fleet', id: 'fleet-table' },
    el(
      'thead',
      {},
      el(
        'tr',
        {},
        el('th', { text: 'Device' }),
        el('th', { text: 'Status' }),
        el('th', { text: 'Last seen' }),
        el('th', { text: 'Latest values' }),
        el('th', { text: 'Labels' }),
      ),
    ),
    tbody,
  );
  const empty = el('p', { class: 'empty', hidden: true });
  const more = el('button', { class: 'btn', type: 'button', hidden: true, text: 'Load more', on: { click: loadMore } });
  view.replaceChildren(
    el('div', { class: 'page-head' }, el('h1', { text: 'Devices' }), count),
    form,
    error,
    el('div', { class: 'table-wrap' }, table),
    empty,
    el('div', { class: 'more' }, more),
  );

  function applyFilter(e) {
    e.preventDefault();
    const label = input.value.trim();
    if (label && !/^[^=]+=.*$/.test(label)) {
      showError('The label filter must look like key=value, for example site=berlin.');
      return;
    }
    location.hash = label ? `#/?label=${encodeURIComponent(label)}` : '#/';
  }

  function showError(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  function describe(e) {
    if (e instanceof ApiError && e.status === 0) return 'The gateway is not reachable; retrying.';
    return e.message;
  }

  async function loadMore() {
    more.disabled = true;
    try {
      const page = await api.listDevices({ label: query.label, cursor, limit: PAGE }, aborter.signal);
      if (stopped) return;
      showError('');
      cursor = page.next_cursor || null;
      const added = [];
      for (const d of page.devices) {
        if (!rows.has(d.id)) added.push(d.id);
        upsert(d);
      }
      more.hidden = !cursor;
      updateCount();
      restartLive();
      fillLatest(added);
    } catch (e) {
      if (e.name !== 'AbortError' && !stopped) showError(describe(e));
    } finally {
      more.disabled = false;
    }
  }

  function updateCount() {
    count.textContent = `${rows.size}${cursor ? '+' : ''} shown`;
    empty.hidden = rows.size > 0;
    empty.textContent = query.label
      ? `No devices with label ${query.label}.`
      : 'No devices yet. Provision one with POST /api/v1/devices.';
  }

  function upsert(d) {
    let row = rows.get(d.id);
    if (!row) {
      const href = `#/device/${encodeURIComponent(d.id)}`;
      const cells = {
        id: el('a', { class: 'device-id', href, text: d.id }),
        name: el('span', { class: 'device-name' }),
        status: el('td', { class: 'status', data: { label: 'Status' } }),
        seen: el('td', { class: 'seen', data: { label: 'Last seen' } }),
        values: el('span', { class: 'values' }),
        labels: el('td', { class: 'labels', data: { label: 'Labels' } }),
      };
      const tr = el(
        'tr',
        { class: 'device-row', data: { device: d.id }, on: { click: (e) => {
          // The whole row opens the device; the link keeps keyboard and middle-click.
          if (!e.target.closest('a')) location.hash = href;
        } } },
        el('td', { class: 'device', data: { label: 'Device' } }, cells.id, cells.name),
        cells.status,
        cells.seen,
        // Chips go in a wrapper: a flex <td> would stop being a table cell.
        el('td', { class: 'values-cell', data: { label: 'Latest' } }, cells.values),
        cells.labels,
      );
      row = { device: d, values: new Map(), tr, cells, lastSeen: NaN };
      rows.set(d.id, row);
      tbody.append(tr);
    }
    row.device = d;
    row.cells.name.textContent = d.name && d.name !== d.id ? d.name : '';
    // Keep the later of the server's view and live traffic seen here.
    const seen = parseTime(d.last_seen);
    if (Number.isFinite(seen) && !(row.lastSeen > seen)) row.lastSeen = seen;
    row.online = d.online;
    row.cells.labels.replaceChildren(labelChips(d.labels));
    renderStatus(row);
  }

  function renderStatus(row) {
    row.cells.status.replaceChildren(badge(row.online));
    row.tr.dataset.online = String(row.online);
    row.cells.seen.textContent = ago(row.lastSeen);
  }

  function renderValues(row) {
    const chips = [...row.values.entries()]
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([metric, { value }]) =>
        el('span', { class: 'value', data: { metric } }, el('span', { class: 'value-name', text: metric }), el('span', { class: 'value-num', text: formatValue(value) })),
      );
    row.cells.values.replaceChildren(...chips);
  }

  /** Apply readings; `seen` marks the devices online (live traffic, not a snapshot). */
  function apply(readings, seen) {
    const touched = new Set();
    for (const r of readings) {
      const row = rows.get(r.device);
      if (!row) continue;
      const cur = row.values.get(r.metric);
      if (!cur || r.ts >= cur.ts) row.values.set(r.metric, { ts: r.ts, value: r.value });
      if (seen) {
        row.online = true;
        row.lastSeen = Date.now();
      }
      touched.add(row);
    }
    for (const row of touched) {
      renderValues(row);
      renderStatus(row);
    }
  }

  function restartLive() {
    if (live) live.stop();
    const devices = [...rows.keys()].slice(0, MAX_STREAMED);
    if (!devices.length) {
      onConn('idle');
      return;
    }
    live = new LiveStream(api, { devices }, {
      onSnapshot: (readings, { fresh }) => {
        if (fresh) for (const row of rows.values()) row.values.clear();
        apply(readings, false);
        if (fresh) {
          for (const row of rows.values()) renderValues(row);
          // Series the live hub has not seen since it started come from the store.
          fillLatest([...rows.keys()].filter((id) => rows.get(id).values.size === 0));
        }
      },
      onReadings: (readings) => apply(readings, true),
      onGapfill: (readings) => apply(readings, false),
      onState: onConn,
    }).start();
  }

  /** Latest stored values for devices the live snapshot did not cover (4 at a time). */
  async function fillLatest(ids) {
    const queue = ids.slice(0, MAX_STREAMED);
    const worker = async () => {
      while (queue.length && !stopped) {
        const id = queue.shift();
        try {
          const latest = await api.latest(id, aborter.signal);
          const row = rows.get(id);
          if (!latest || !row || stopped) continue;
          const readings = Object.entries(latest.metrics || {}).map(([metric, v]) => ({ device: id, metric, ts: v.ts, value: v.value }));
          apply(readings, false);
        } catch (e) {
          if (e.name === 'AbortError') return;
          // A missing value is not worth an error banner; the stream will fill it.
        }
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
  }

  /** Re-read the listed devices' status (online/offline transitions have no event). */
  async function refresh() {
    try {
      const limit = Math.min(1000, Math.max(rows.size, 1));
      const page = await api.listDevices({ label: query.label, limit }, aborter.signal);
      if (stopped) return;
      showError('');
      for (const d of page.devices) if (rows.has(d.id)) upsert(d);
    } catch (e) {
      if (e.name !== 'AbortError' && !stopped) showError(describe(e));
    }
  }

  const ticker = setInterval(() => {
    for (const row of rows.values()) row.cells.seen.textContent = ago(row.lastSeen);
  }, 1000);
  const refresher = setInterval(refresh, REFRESH_MS);
  loadMore();

  return {
    stop() {
      stopped = true;
      aborter.abort();
      clearInterval(ticker);
      clearInterval(refresher);
      if (live) live.stop();
    },
  };
}
