// The REST API client. Every request carries the operator's API key as a bearer
// header; the key never goes into a URL (live streams use short-lived stream tokens).

/** An API failure: `status` is the HTTP status, or 0 when the gateway was unreachable. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.name = 'ApiError';
    this.status = status;
  }
}

/** Where the key lives: sessionStorage, so it dies with the tab and is not shared. */
const KEY_ITEM = 'fluxgate.apiKey';

export function storedKey() {
  try {
    return sessionStorage.getItem(KEY_ITEM);
  } catch {
    return null;
  }
}

export function storeKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_ITEM, key);
    else sessionStorage.removeItem(KEY_ITEM);
  } catch {
    // Storage can be disabled; the key then lasts until the page is reloaded.
  }
}

export class Api {
  /**
   * @param {string} key the operator API key (`fgk_…`)
   * @param {() => void} onUnauthorized called once the gateway answers 401
   */
  constructor(key, onUnauthorized) {
    this.key = key;
    this.onUnauthorized = onUnauthorized;
  }

  async request(path, { method = 'GET', signal, body } = {}) {
    let response;
    const headers = { Authorization: `Bearer ${this.key}`, Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    try {
      response = await fetch(path, {
        method,
        signal,
        cache: 'no-store',
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      if (e && e.name === 'AbortError') throw e;
      throw new ApiError(0, 'the gateway is not reachable');
    }
    if (response.status === 401) {
      this.onUnauthorized();
      throw new ApiError(401, await problemDetail(response));
    }
    if (!response.ok) throw new ApiError(response.status, await problemDetail(response));
    try {
      return await response.json();
    } catch {
      throw new ApiError(response.status, 'the gateway sent an unreadable answer');
    }
  }

  /** One page of devices: `{devices, next_cursor?}`. */
  listDevices({ label, cursor, limit = 50 } = {}, signal) {
    const q = new URLSearchParams();
    if (label) q.set('label', label);
    if (cursor) q.set('cursor', cursor);
    q.set('limit', String(limit));
    return this.request(`/api/v1/devices?${q}`, { signal });
  }

  getDevice(id, signal) {
    return this.request(`/api/v1/devices/${encodeURIComponent(id)}`, { signal });
  }

  /** Latest value per metric, or null when nothing is stored for the device yet. */
  async latest(id, signal) {
    try {
      return await this.request(`/api/v1/devices/${encodeURIComponent(id)}/latest`, { signal });
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) return null;
      throw e;
    }
  }

  /** Points of one metric in [from, to), averaged per `stepMs` when given. */
  readings(id, metric, fromMs, toMs, stepMs, signal) {
    const q = new URLSearchParams({ metric, from: String(fromMs), to: String(toMs) });
    if (stepMs) {
      q.set('step', `${stepMs}ms`);
      q.set('agg', 'avg');
    }
    return this.request(`/api/v1/devices/${encodeURIComponent(id)}/readings?${q}`, { signal });
  }

  /** Send a command to a device (admin key): the command resource. */
  sendCommand(id, name, params) {
    return this.request(`/api/v1/devices/${encodeURIComponent(id)}/commands`, {
      method: 'POST',
      body: { name, params },
    });
  }

  /** One page of a device's commands, oldest first: `{commands, next_cursor?}`. */
  listCommands(id, signal) {
    return this.request(`/api/v1/devices/${encodeURIComponent(id)}/commands?limit=1000`, { signal });
  }

  /** A short-lived token for `?access_token=` on the live stream. */
  streamToken() {
    return this.request('/api/v1/stream-tokens', { method: 'POST' });
  }
}

async function problemDetail(response) {
  try {
    const body = await response.json();
    if (body && typeof body.detail === 'string') return body.detail;
  } catch {
    // Not problem+json (a proxy's error page): fall back to the status line.
  }
  return `${response.status} ${response.statusText}`.trim();
}
