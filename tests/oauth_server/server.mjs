// A real OAuth 2.0 authorization server for fhir-sidecar's tests (oidc-provider 8.x).
//
// Started by tests/support/oauth_provider.py, which generates every key and certificate and
// passes them in a JSON file named by OAUTH_TEST_CONFIG. Two listeners on 127.0.0.1:
//   - HTTPS (the provider itself): /token, /jwks, discovery, plus a SMART configuration at
//     /fhir/.well-known/smart-configuration so `discover_from` can be exercised. With
//     `mtls.client_ca` in the config it asks every client for a certificate (RFC 8705: it
//     accepts connections without one, and verifies against that CA those that send one) and
//     turns on oidc-provider's mTLS feature: tls_client_auth, self_signed_tls_client_auth and
//     certificate-bound access tokens;
//   - plain HTTP control port (/_test/...): counters, failure injection, runtime settings.
//     It is separate so it keeps answering while the HTTPS listener is made to refuse.
// Once both listen, one JSON line {"event":"ready",...} is printed on stdout.

import { X509Certificate, createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';

import Provider, { errors } from 'oidc-provider';

const cfg = JSON.parse(readFileSync(process.env.OAUTH_TEST_CONFIG, 'utf8'));
const HOST = '127.0.0.1';
const TOKEN_PATH = '/token';
// The token endpoint again under another path, for RFC 8705 §5 mtls_endpoint_aliases: a test
// names it in the SMART configuration (smart_overrides); records say which path was used.
const MTLS_TOKEN_PATH = '/mtls/token';
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
const mtls = Boolean(cfg.mtls?.client_ca);
const tlsOptions = { cert: readFileSync(cfg.tls.cert_chain), key: readFileSync(cfg.tls.key) };
if (mtls) {
  // Ask for a certificate, never require one: self-signed ones (self_signed_tls_client_auth)
  // do not chain to the CA, and clients of the other methods send none. The provider decides.
  Object.assign(tlsOptions, {
    requestCert: true, rejectUnauthorized: false, ca: readFileSync(cfg.mtls.client_ca),
  });
}
const tlsServer = https.createServer(tlsOptions, (req, res) => handler(req, res));
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

// The client certificate of the request's TLS connection (undefined when none was sent).
function peerCertificate(ctx) {
  const socket = ctx.req.socket;
  if (typeof socket.getPeerCertificate !== 'function') return undefined;
  const peer = socket.getPeerCertificate();
  if (!peer || !peer.raw) return undefined;
  return new X509Certificate(peer.raw);
}

// RFC 8705 section 2.1.2: the registered value must match one of the certificate's.
function subjectMatches(ctx, property, expected) {
  const cert = peerCertificate(ctx);
  if (!cert) return false;
  const sans = (cert.subjectAltName ?? '').split(', ');
  switch (property) {
    case 'tls_client_auth_subject_dn':
      return cert.subject.split('\n').reverse().join(',') === expected
        || cert.subject.split('\n').join(',') === expected;
    case 'tls_client_auth_san_dns': return sans.includes(`DNS:${expected}`);
    case 'tls_client_auth_san_uri': return sans.includes(`URI:${expected}`);
    case 'tls_client_auth_san_ip': return sans.includes(`IP Address:${expected}`);
    case 'tls_client_auth_san_email': return sans.includes(`email:${expected}`);
    default: return false;
  }
}

const mtlsMethods = mtls ? ['tls_client_auth', 'self_signed_tls_client_auth'] : [];

const provider = new Provider(issuer, {
  clients: cfg.clients,
  jwks: { keys: [cfg.signing_jwk] },
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt', ...mtlsMethods],
  cookies: { keys: [randomBytes(32).toString('hex')] }, // unused (no browser flows); quiets a warning
  ttl: { ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? state.settings.ttl },
  enabledJWA: { clientAuthSigningAlgValues: ['RS256', 'RS384', 'ES256', 'ES384'] },
  features: {
    clientCredentials: { enabled: true },
    mTLS: {
      enabled: mtls,
      certificateBoundAccessTokens: mtls,
      tlsClientAuth: mtls,
      selfSignedTlsClientAuth: mtls,
      getCertificate: peerCertificate,
      certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
      certificateSubjectMatches: subjectMatches,
    },
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
      ['client_secret_basic', 'client_secret_post', 'private_key_jwt', ...mtlsMethods],
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
  const requestedPath = ctx.path;
  if (ctx.path === MTLS_TOKEN_PATH) ctx.path = TOKEN_PATH;
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
  record(ctx, requestedPath);
  if (ctx.status === 200 && state.settings.strip_expires_in && ctx.body && typeof ctx.body === 'object') {
    delete ctx.body.expires_in;
  }
});

// The form as oidc-provider parsed it (every parameter, known to it or not), for asserts.
function record(ctx, path) {
  const params = { ...(ctx.oidc?.body ?? {}) };
  const cert = peerCertificate(ctx);
  state.recent.push({
    client_id: ctx.oidc?.client?.clientId ?? null,
    path,
    authorization: ctx.get('authorization') || null,
    params,
    status: ctx.status,
    // base64url SHA-256 of the client certificate's DER (RFC 8705 x5t#S256), or null.
    client_cert_x5t_s256: cert ? createHash('sha256').update(cert.raw).digest('base64url') : null,
    error: ctx.status === 200 ? null : (ctx.body?.error_description ?? ctx.body?.error ?? null),
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
