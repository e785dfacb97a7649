// The live stream: one EventSource on /api/v1/live/sse for a set of devices.
//
// Positions `{epoch}:{seq}` make delivery exactly-once for the page: a reading whose
// position is not after the last applied one (same epoch, seq not greater) is a replay
// and is dropped. A new epoch (the gateway restarted) or a `reset` event means the
// positions we hold are meaningless, so the next snapshot replaces the page's state.
//
// Reconnects: while the EventSource retries by itself it sends `Last-Event-ID`, so the
// gateway resumes after the last event we saw. When it gives up (CLOSED: the stream
// token expired, the gateway restarted and no longer knows the token, or it answered an
// error), we mint a fresh token and reconnect with `since={last position}`.

import { ApiError } from './api.js';

/** Parse `{epoch}:{seq}`; null when malformed. BigInt: both are u64 on the wire. */
export function parsePos(pos) {
  if (typeof pos !== 'string') return null;
  const m = /^(\d+):(\d+)$/.exec(pos);
  if (!m) return null;
  return { epoch: BigInt(m[1]), seq: BigInt(m[2]) };
}

/** How long a connection may fail before the indicator says "offline". */
const OFFLINE_AFTER_MS = 20_000;
const MAX_BACKOFF_MS = 30_000;

export class LiveStream {
  /**
   * @param {import('./api.js').Api} api
   * @param {{devices?: string[], metrics?: string[]}} filter
   * @param {{
   *   onSnapshot?: (readings: object[], info: {fresh: boolean}) => void,
   *   onReadings?: (readings: object[]) => void,
   *   onGapfill?: (readings: object[]) => void,
   *   onReset?: (reason: string) => void,
   *   onConflated?: (count: number) => void,
   *   onCommand?: (command: object) => void,
   *   onState?: (state: 'connecting'|'live'|'reconnecting'|'offline') => void,
   * }} handlers
   */
  constructor(api, filter, handlers) {
    this.api = api;
    this.filter = filter;
    this.h = handlers;
    this.es = null;
    this.epoch = null; // BigInt of the applied state, null before the first snapshot
    this.seq = -1n; // last applied seq in `epoch`
    this.resync = true; // the next snapshot replaces state
    this.useSince = true; // cleared when a `since` connection was refused
    this.attempts = 0;
    this.retryTimer = 0;
    this.offlineTimer = 0;
    this.state = null;
    this.stopped = false;
    this.onOnline = () => {
      if (!this.es && !this.stopped) this.reconnectNow();
    };
  }

  start() {
    window.addEventListener('online', this.onOnline);
    this.setState('connecting');
    this.connect();
    return this;
  }

  stop() {
    this.stopped = true;
    window.removeEventListener('online', this.onOnline);
    clearTimeout(this.retryTimer);
    clearTimeout(this.offlineTimer);
    if (this.es) this.es.close();
    this.es = null;
  }

  /** The position of the last applied reading, or null. */
  get lastPos() {
    return this.epoch === null || this.seq < 0n ? null : `${this.epoch}:${this.seq}`;
  }

  setState(state) {
    if (this.stopped || state === this.state) return;
    this.state = state;
    clearTimeout(this.offlineTimer);
    if (state === 'reconnecting' || state === 'connecting') {
      this.offlineTimer = setTimeout(() => this.setState('offline'), OFFLINE_AFTER_MS);
    }
    if (this.h.onState) this.h.onState(state);
  }

  reconnectNow() {
    clearTimeout(this.retryTimer);
    this.attempts = 0;
    this.connect();
  }

  scheduleReconnect() {
    if (this.stopped) return;
    this.attempts += 1;
    // Exponential backoff with jitter so a restarted gateway is not hit by every tab
    // at the same instant.
    const base = Math.min(MAX_BACKOFF_MS, 500 * 2 ** Math.min(this.attempts, 10));
    const delay = base / 2 + Math.random() * (base / 2);
    this.setState(navigator.onLine === false ? 'offline' : 'reconnecting');
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  async connect() {
    if (this.stopped) return;
    let token;
    try {
      token = (await this.api.streamToken()).token;
    } catch (e) {
      // 401: the key itself is gone; the app has already gone back to sign-in.
      if (e instanceof ApiError && e.status === 401) return this.stop();
      return this.scheduleReconnect();
    }
    if (this.stopped) return;
    const q = new URLSearchParams();
    if (this.filter.devices && this.filter.devices.length) q.set('device', this.filter.devices.join(','));
    if (this.filter.metrics && this.filter.metrics.length) q.set('metric', this.filter.metrics.join(','));
    const since = this.useSince ? this.lastPos : null;
    if (since) q.set('since', since);
    else if (this.epoch !== null) this.resync = true; // cannot resume: start over
    q.set('access_token', token);
    this.open(`/api/v1/live/sse?${q}`, since !== null);
  }

  open(url, resuming) {
    const es = new EventSource(url);
    this.es = es;
    let opened = false;
    const mine = (fn) => (event) => {
      if (this.es === es && !this.stopped) fn(event);
    };
    es.onopen = mine(() => {
      opened = true;
      this.attempts = 0;
      this.useSince = true;
      this.setState('live');
    });
    es.onerror = mine(() => {
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        this.es = null;
        // Refused before it ever opened while asking to resume: maybe this gateway
        // cannot resume from that position. Next time subscribe afresh (and resync).
        if (!opened && resuming) this.useSince = false;
        this.scheduleReconnect();
      } else {
        // The browser retries by itself, sending Last-Event-ID.
        this.setState(navigator.onLine === false ? 'offline' : 'reconnecting');
      }
    });
    es.addEventListener('snapshot', mine((e) => this.onSnapshot(e)));
    es.addEventListener('readings', mine((e) => this.onReadings(e)));
    es.addEventListener('conflated', mine((e) => {
      const msg = parse(e.data);
      if (msg && this.h.onConflated) this.h.onConflated(Number(msg.count) || 0);
    }));
    // Readings from the store for a resume older than the gateway's memory. They carry
    // no positions; consumers apply values by (device, metric, ts), so overlaps with
    // what the page already has are harmless.
    es.addEventListener('gapfill', mine((e) => {
      const msg = parse(e.data);
      if (msg && Array.isArray(msg.readings) && this.h.onGapfill) this.h.onGapfill(msg.readings);
    }));
    // A downlink command of a watched device changed state.
    es.addEventListener('command', mine((e) => {
      const msg = parse(e.data);
      if (msg && this.h.onCommand) this.h.onCommand(msg);
    }));
    es.addEventListener('reset', mine((e) => {
      const msg = parse(e.data) || {};
      this.resync = true;
      if (this.h.onReset) this.h.onReset(String(msg.reason || 'reset'));
    }));
  }

  onSnapshot(e) {
    const msg = parse(e.data);
    if (!msg || !Array.isArray(msg.readings)) return;
    this.setState('live');
    let epoch;
    try {
      epoch = BigInt(msg.epoch);
    } catch {
      return;
    }
    const fresh = this.resync || this.epoch === null || epoch !== this.epoch;
    const readings = msg.readings.filter((r) => parsePos(r.pos));
    if (fresh) {
      this.epoch = epoch;
      // The snapshot reflects the stream up to `position`; readings after it follow.
      const at = parsePos(msg.position);
      this.seq = at && at.epoch === epoch ? at.seq : -1n;
      for (const r of readings) {
        const p = parsePos(r.pos);
        if (p.epoch === epoch && p.seq > this.seq) this.seq = p.seq;
      }
      this.resync = false;
    }
    // On a resumed stream (same epoch) the snapshot's readings may also arrive as a
    // replay; consumers apply values by timestamp, so seeing one twice is harmless, and
    // `seq` is left alone so the replay itself is not dropped.
    if (this.h.onSnapshot) this.h.onSnapshot(readings, { fresh });
  }

  onReadings(e) {
    const msg = parse(e.data);
    if (!msg || !Array.isArray(msg.readings)) return;
    this.setState('live');
    const fresh = [];
    for (const r of msg.readings) {
      const p = parsePos(r.pos);
      if (!p) continue;
      if (this.epoch === null || p.epoch !== this.epoch) {
        // Readings of another epoch without a snapshot first: adopt it rather than
        // drop everything from now on.
        this.epoch = p.epoch;
        this.seq = -1n;
      }
      if (p.seq <= this.seq) continue; // already applied (a replay after a resume)
      this.seq = p.seq;
      fresh.push(r);
    }
    if (fresh.length && this.h.onReadings) this.h.onReadings(fresh);
  }
}

function parse(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}
