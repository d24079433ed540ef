// A real OAuth 2.0 authorization server for fhir-sidecar's tests (oidc-provider 8.x).
//
// Started by tests/support/oauth_provider.py, which generates every key and certificate and
// passes them in a JSON file named by OAUTH_TEST_CONFIG. Two listeners on 127.0.0.1:
//   - HTTPS (the provider itself): /token, /jwks, discovery, plus a SMART configuration at
//     /fhir/.well-known/smart-configuration so `discover_from` can be exercised;
//   - plain HTTP control port (/_test/...): counters, failure injection, runtime settings.
//     It is separate so it keeps answering while the HTTPS listener is made to refuse.
// Once both listen, one JSON line {"event":"ready",...} is printed on stdout.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';

import Provider, { errors } from 'oidc-provider';

const cfg = JSON.parse(readFileSync(process.env.OAUTH_TEST_CONFIG, 'utf8'));
const HOST = '127.0.0.1';
const TOKEN_PATH = '/token';
const SMART_PATH = '/fhir/.well-known/smart-configuration';
const RECENT_LIMIT = 500;

const initialSettings = () => ({
  ttl: cfg.ttl_seconds ?? 300,
  strip_expires_in: false,
  smart_overrides: {},
});

const state = {
  generation: 0, // bumped by reset: requests still delayed from an earlier test are not counted
  settings: initialSettings(),
  failure: { mode: 'none' },
  stats: { token_requests: 0, issued: 0, failed: 0 },
  recent: [], // the last token requests: form parameters and Authorization header, for asserts
};

function resetState() {
  state.generation += 1;
  state.settings = initialSettings();
  state.failure = { mode: 'none' };
  state.stats = { token_requests: 0, issued: 0, failed: 0 };
  state.recent = [];
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// --- the HTTPS listener ---------------------------------------------------------------------

let handler = (req, res) => { res.statusCode = 503; res.end(); };
const sockets = new Set();
const tlsServer = https.createServer(
  { cert: readFileSync(cfg.tls.cert_chain), key: readFileSync(cfg.tls.key) },
  (req, res) => handler(req, res),
);
tlsServer.on('connection', (socket) => {
  sockets.add(socket);
  socket.on('close', () => sockets.delete(socket));
});
tlsServer.keepAliveTimeout = 30_000;

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, HOST, () => {
      server.off('error', reject);
      resolve(server.address().port);
    });
  });
}

// "refuse" must look like a dead endpoint to a client with pooled keep-alive connections too:
// stop accepting and cut the open connections, so the next attempt gets ECONNREFUSED.
let refusing = false;
let tlsPort = 0;

async function startRefusing() {
  if (refusing) return;
  refusing = true;
  await new Promise((resolve) => {
    tlsServer.close(() => resolve());
    for (const socket of sockets) socket.destroy();
  });
}

async function stopRefusing() {
  if (!refusing) return;
  await listen(tlsServer, tlsPort);
  refusing = false;
}

tlsPort = await listen(tlsServer, cfg.port ?? 0);
const issuer = `https://${HOST}:${tlsPort}`;

// --- the provider ---------------------------------------------------------------------------

const resourceServer = (indicator) => ({
  scope: cfg.scopes.join(' '),
  audience: indicator,
  accessTokenTTL: state.settings.ttl,
  accessTokenFormat: 'jwt',
  jwt: { sign: { alg: 'RS256' } },
});

const provider = new Provider(issuer, {
  clients: cfg.clients,
  jwks: { keys: [cfg.signing_jwk] },
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  cookies: { keys: [randomBytes(32).toString('hex')] }, // unused (no browser flows); quiets a warning
  ttl: { ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? state.settings.ttl },
  enabledJWA: { clientAuthSigningAlgValues: ['RS256', 'RS384', 'ES256', 'ES384'] },
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => cfg.default_resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator) => {
        if (!cfg.resources.includes(indicator)) {
          throw new errors.InvalidTarget(`unknown resource ${indicator}`);
        }
        return resourceServer(indicator);
      },
    },
  },
  // Only the client_credentials grant is used; nothing here renders a login page.
  async findAccount() { return undefined; },
});

function smartConfiguration() {
  const doc = {
    issuer,
    token_endpoint: `${issuer}${TOKEN_PATH}`,
    jwks_uri: `${issuer}/jwks`,
    grant_types_supported: ['client_credentials'],
    token_endpoint_auth_methods_supported:
      ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
    token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
    scopes_supported: cfg.scopes,
    capabilities: ['client-confidential-asymmetric', 'client-confidential-symmetric'],
  };
  for (const [key, value] of Object.entries(state.settings.smart_overrides)) {
    if (value === null) delete doc[key];
    else doc[key] = value;
  }
  return doc;
}

// Runs before the provider's own routes: counting, failure injection, response rewriting.
provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.path === SMART_PATH) {
    ctx.type = 'application/json';
    ctx.body = smartConfiguration();
    return;
  }
  if (ctx.path !== TOKEN_PATH) {
    await next();
    return;
  }
  state.stats.token_requests += 1;
  const { failure, generation } = state;
  if (failure.mode === 'delay') {
    await sleep(failure.delay_ms ?? 5_000);
  } else if (failure.mode === 'status') {
    state.stats.failed += 1;
    ctx.status = failure.status ?? 503;
    if (failure.body !== undefined) {
      ctx.type = failure.content_type ?? 'text/plain';
      ctx.body = failure.body;
    } else {
      ctx.body = { error: 'temporarily_unavailable', error_description: 'injected outage' };
    }
    return;
  }
  await next();
  if (generation !== state.generation) return;
  if (ctx.status === 200) state.stats.issued += 1;
  else state.stats.failed += 1;
  record(ctx);
  if (ctx.status === 200 && state.settings.strip_expires_in && ctx.body && typeof ctx.body === 'object') {
    delete ctx.body.expires_in;
  }
});

// The form as oidc-provider parsed it (every parameter, known to it or not), for asserts.
function record(ctx) {
  const params = { ...(ctx.oidc?.body ?? {}) };
  state.recent.push({
    client_id: ctx.oidc?.client?.clientId ?? null,
    authorization: ctx.get('authorization') || null,
    params,
    status: ctx.status,
  });
  if (state.recent.length > RECENT_LIMIT) state.recent.shift();
}

handler = provider.callback();

// --- the control listener -------------------------------------------------------------------

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : {};
}

function reply(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

const control = http.createServer(async (req, res) => {
  try {
    const { pathname } = new URL(req.url, 'http://control');
    if (req.method === 'GET' && pathname === '/_test/stats') {
      reply(res, 200, { ...state.stats, refusing, failure: state.failure });
    } else if (req.method === 'GET' && pathname === '/_test/recent') {
      reply(res, 200, state.recent);
    } else if (req.method === 'POST' && pathname === '/_test/reset') {
      resetState();
      await stopRefusing();
      reply(res, 200, { ok: true });
    } else if (req.method === 'POST' && pathname === '/_test/fail') {
      // {"mode": "none" | "status" | "delay" | "refuse", "status"?, "body"?, "delay_ms"?}
      const body = await readJson(req);
      if (!['none', 'status', 'delay', 'refuse'].includes(body.mode)) {
        reply(res, 400, { error: `unknown mode ${body.mode}` });
        return;
      }
      state.failure = body;
      if (body.mode === 'refuse') await startRefusing();
      else await stopRefusing();
      reply(res, 200, { ok: true });
    } else if (req.method === 'POST' && pathname === '/_test/settings') {
      // {"ttl"?: seconds, "strip_expires_in"?: bool, "smart_overrides"?: {key: value|null}}
      Object.assign(state.settings, await readJson(req));
      reply(res, 200, state.settings);
    } else {
      reply(res, 404, { error: 'not found' });
    }
  } catch (err) {
    reply(res, 500, { error: String(err) });
  }
});

const controlPort = await listen(control, 0);

const shutdown = () => {
  control.close();
  tlsServer.close();
  for (const socket of sockets) socket.destroy();
  process.exit(0);
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

process.stdout.write(`${JSON.stringify({
  event: 'ready', issuer, port: tlsPort, control_port: controlPort,
})}\n`);
