// The dashboard shell: sign-in, hash routing (`#/`, `#/?label=k=v`, `#/device/{id}`),
// the connection indicator and sign-out. Pages live in fleet.js and device.js.
//
// The API key comes from the sign-in form or once from the URL fragment `#key=…` (the
// link the gateway prints at first start; fragments never reach a server). It is kept
// in sessionStorage only, and removed from the address bar at once so it does not end
// up in history, bookmarks or screenshots.

import { Api, ApiError, storeKey, storedKey } from './api.js';
import { devicePage } from './device.js';
import { el } from './dom.js';
import { fleetPage } from './fleet.js';

const view = document.getElementById('view');
const conn = document.getElementById('conn-status');
const signOutButton = document.getElementById('sign-out');

const CONN_LABELS = {
  idle: 'idle',
  connecting: 'connecting…',
  live: 'live',
  reconnecting: 'reconnecting…',
  offline: 'offline',
};

let api = null;
let page = null;
let signInMessage = '';

function setConn(state) {
  conn.hidden = false;
  conn.dataset.state = state;
  conn.querySelector('.conn-label').textContent = CONN_LABELS[state] || state;
  conn.title = `Live updates: ${CONN_LABELS[state] || state}`;
}

function onUnauthorized() {
  if (!storedKey()) return;
  storeKey(null);
  signInMessage = 'The gateway did not accept your API key (it may have been revoked). Sign in again.';
  // Leave the current call stack first: the page that got the 401 is still unwinding.
  queueMicrotask(route);
}

function signOut() {
  storeKey(null);
  api = null;
  signInMessage = 'Signed out.';
  if (location.hash !== '#/') history.replaceState(null, '', `${location.pathname}#/`);
  route();
}

function route() {
  if (page) page.stop();
  page = null;
  const key = storedKey();
  if (!key) {
    api = null;
    signOutButton.hidden = true;
    conn.hidden = true;
    page = signInPage();
    return;
  }
  if (!api || api.key !== key) api = new Api(key, onUnauthorized);
  signOutButton.hidden = false;
  setConn('idle');
  const hash = location.hash;
  const device = /^#\/device\/([^?]+)/.exec(hash);
  if (device) {
    let id;
    try {
      id = decodeURIComponent(device[1]);
    } catch {
      id = device[1];
    }
    page = devicePage(api, view, id, setConn);
    return;
  }
  const q = new URLSearchParams(hash.includes('?') ? hash.slice(hash.indexOf('?') + 1) : '');
  document.title = 'Devices · fluxgate';
  page = fleetPage(api, view, { label: q.get('label') || '' }, setConn);
}

function signInPage() {
  document.title = 'Sign in · fluxgate';
  const input = el('input', {
    id: 'api-key',
    type: 'password',
    name: 'key',
    required: true,
    autocomplete: 'off',
    spellcheck: false,
    placeholder: 'fgk_…',
  });
  const message = el('p', {
    class: `notice ${signInMessage.startsWith('Signed out') ? '' : 'notice-error'}`,
    id: 'sign-in-message',
    text: signInMessage,
    hidden: !signInMessage,
    attrs: { role: 'alert' },
  });
  const button = el('button', { class: 'btn btn-primary', type: 'submit', text: 'Sign in' });
  let stopped = false;
  const form = el(
    'form',
    {
      class: 'card sign-in',
      id: 'sign-in',
      on: {
        submit: async (e) => {
          e.preventDefault();
          const key = input.value.trim();
          if (!key) return;
          button.disabled = true;
          message.hidden = true;
          // Check the key before keeping it, so a typo gets an answer right here.
          const probe = new Api(key, () => {});
          try {
            await probe.listDevices({ limit: 1 });
            if (stopped) return;
            signInMessage = '';
            storeKey(key);
            if (location.hash.startsWith('#/')) route();
            else location.hash = '#/';
          } catch (err) {
            if (stopped) return;
            message.className = 'notice notice-error';
            message.textContent =
              err instanceof ApiError && err.status === 401
                ? 'The gateway did not accept this API key.'
                : `Sign-in failed: ${err.message}`;
            message.hidden = false;
          } finally {
            button.disabled = false;
          }
        },
      },
    },
    el('h1', { text: 'Sign in' }),
    el('p', { class: 'hint', text: 'Use an operator API key (viewer or admin). It is kept for this browser tab only.' }),
    message,
    el('label', { htmlFor: 'api-key', text: 'API key' }),
    input,
    button,
  );
  view.replaceChildren(form);
  input.focus();
  return {
    stop() {
      stopped = true;
    },
  };
}

function takeKeyFromFragment() {
  const m = /^#(?:.*&)?key=([^&]*)/.exec(location.hash);
  if (!m) return;
  let key = m[1];
  try {
    key = decodeURIComponent(key);
  } catch {
    // Keep it as written.
  }
  if (key) {
    storeKey(key);
    signInMessage = '';
  }
  // replaceState: the URL with the key must not stay in the history stack.
  history.replaceState(null, '', `${location.pathname}${location.search}#/`);
}

takeKeyFromFragment();
signOutButton.addEventListener('click', signOut);
window.addEventListener('hashchange', () => {
  takeKeyFromFragment();
  route();
});
route();
