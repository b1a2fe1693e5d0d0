// Development-only OpenID Connect provider (npm oidc-provider) for tests and `make demo`.
// Never expose it: the passwords are public and keys live in memory. See README.md.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

// stdout carries exactly one JSON line for the parent process; everything else goes to stderr.
const warn = console.warn.bind(console);
console.log = console.info = console.error;
console.warn = (msg, ...rest) => { // oidc-provider 9 asks for Node 22+; it works on Node 20
  if (!String(msg).includes('Unsupported runtime')) warn(msg, ...rest);
};
const { default: Provider, errors } = await import('oidc-provider');
const { createMemoryAdapter } = await import('oidc-provider/lib/adapters/memory_adapter.js');

const FLAGS = {
  host: ['127.0.0.1'], port: ['0'], issuer: [''], users: [''], 'admin-token': [''],
  'access-token-ttl': ['300'], 'client-credentials-ttl': [''], 'id-token-ttl': ['3600'],
  'refresh-token-ttl': ['86400'], 'device-code-ttl': ['600'], audience: ['tunnel'],
  resource: ['urn:identity-tunnel:relay'], 'web-redirect': [], 'web-post-logout-redirect': [],
};
const options = { 'exit-on-stdin-close': { type: 'boolean' } };
for (const [name, def] of Object.entries(FLAGS)) {
  const env = process.env[`DEV_IDP_${name.toUpperCase().replaceAll('-', '_')}`];
  const multiple = def.length === 0;
  const fallback = multiple ? (env ? env.split(' ') : []) : (env ?? def[0]);
  options[name] = { type: 'string', multiple, default: fallback };
}
const { values: opt } = parseArgs({ options, strict: true });
const seconds = (name, fallback) => {
  const value = Number(opt[name] || fallback);
  if (!Number.isSafeInteger(value) || value <= 0) {
    throw new Error(`--${name} must be a positive integer`);
  }
  return value;
};
const TTL = {
  access: seconds('access-token-ttl'),
  cc: seconds('client-credentials-ttl', opt['access-token-ttl']),
  id: seconds('id-token-ttl'),
  refresh: seconds('refresh-token-ttl'),
  device: seconds('device-code-ttl'),
};
const { audience: AUDIENCE, resource: RESOURCE } = opt;
const CLI = 'tunnel-cli';

// --- users ----------------------------------------------------------------------------------
const DEFAULT_USERS = [
  { sub: 'alice', email: 'alice@example.com', name: 'Alice Example', groups: ['ops', 'dev'] },
  { sub: 'bob', email: 'bob@example.com', name: 'Bob Example', groups: ['dev'] },
  { sub: 'mallory', email: 'mallory@example.com', name: 'Mallory Example', groups: [] },
];
const users = new Map();
for (const u of opt.users ? JSON.parse(fs.readFileSync(opt.users, 'utf8')) : DEFAULT_USERS) {
  if (typeof u?.email !== 'string' || !u.email.includes('@')) {
    throw new Error(`--users: every user needs an email: ${JSON.stringify(u)}`);
  }
  const user = { password: 'demo-password', email_verified: true, groups: [], ...u };
  user.sub ??= user.email.split('@')[0];
  user.name ??= user.sub;
  users.set(user.sub, user);
}
const findUser = (login) => [...users.values()].find(
  (u) => u.sub === login || u.email.toLowerCase() === String(login).trim().toLowerCase(),
);
const digest = (s) => crypto.createHash('sha256').update(String(s)).digest();
const userClaims = (user, scopes) => ({
  ...(scopes.has('email') && { email: user.email, email_verified: user.email_verified }),
  ...(scopes.has('profile') && { name: user.name }),
  ...(scopes.has('groups') && { groups: [...user.groups] }),
});

// --- signing keys: the first key of each type signs; rotated-out keys stay published ----------
const keys = [];
function newKey(alg) {
  const { privateKey } = alg === 'ES256'
    ? crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' })
    : crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const kid = `${alg.toLowerCase()}-${crypto.randomBytes(6).toString('hex')}`;
  const jwk = { ...privateKey.export({ format: 'jwk' }), alg, use: 'sig', kid };
  keys.unshift(jwk);
  const sameAlg = keys.filter((k) => k.alg === alg);
  if (sameAlg.length > 5) keys.splice(keys.indexOf(sameAlg.at(-1)), 1); // keep the JWKS small
  return jwk.kid;
}
newKey('ES256');
newKey('RS256');

// --- the provider; rebuilt on key rotation, sharing storage and cookie keys -----------------
const adapter = createMemoryAdapter(15);
const grantsByUser = new Map(); // sub -> Set(grantId), for /admin/revoke
const trackingAdapter = (model) => {
  const inner = adapter(model);
  if (model !== 'Grant') return inner;
  const upsert = inner.upsert.bind(inner);
  inner.upsert = async (id, payload, expiresIn) => {
    if (!grantsByUser.has(payload.accountId)) grantsByUser.set(payload.accountId, new Set());
    grantsByUser.get(payload.accountId).add(id);
    return upsert(id, payload, expiresIn);
  };
  return inner;
};
const cookieKeys = [crypto.randomBytes(32).toString('base64url')];
const page = (title, body) => '<!DOCTYPE html><html><head><meta charset="utf-8">'
  + `<title>${title}</title></head><body style="font-family:sans-serif;max-width:28em;margin:3em auto">`
  + `<h1>${title}</h1>${body}</body></html>`;
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function configuration() {
  const web = opt['web-redirect'].length ? opt['web-redirect'] : ['http://127.0.0.1:8080/callback'];
  return {
    adapter: trackingAdapter,
    jwks: { keys: keys.map((k) => ({ ...k })) },
    cookies: { keys: cookieKeys },
    clients: [
      { // native (RFC 8252): any port on the loopback redirect URIs is accepted
        client_id: CLI, client_name: 'Tunnel CLI', application_type: 'native', token_endpoint_auth_method: 'none',
        grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
        response_types: ['code'], redirect_uris: ['http://127.0.0.1/callback', 'http://[::1]/callback'],
      },
      {
        client_id: 'svc-backup', client_secret: 'svc-backup-secret', client_name: 'Backup service account',
        grant_types: ['client_credentials'], response_types: [], redirect_uris: [],
      },
      {
        client_id: 'tunnel-web', client_secret: 'tunnel-web-secret', client_name: 'Tunnel (web)',
        grant_types: ['authorization_code', 'refresh_token'], response_types: ['code'], redirect_uris: web,
        post_logout_redirect_uris: opt['web-post-logout-redirect'],
      },
    ],
    claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'] },
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    responseTypes: ['code'],
    clientAuthMethods: ['none', 'client_secret_basic', 'client_secret_post'],
    pkce: { required: () => true },
    clientBasedCORS: () => false,
    async findAccount(ctx, sub) {
      const user = users.get(sub);
      const claims = (use, scope) => ({ sub, ...userClaims(user, new Set(scope.split(' '))) });
      return user && { accountId: sub, claims };
    },
    async extraTokenClaims(ctx, token) {
      const user = token.accountId && users.get(token.accountId);
      return user ? userClaims(user, token.scopes) : undefined;
    },
    issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token')
      && (client.clientId === CLI || code.scopes.has('offline_access')),
    rotateRefreshToken: () => true,
    expiresWithSession: async () => false,
    ttl: {
      AccessToken: TTL.access, ClientCredentials: TTL.cc, IdToken: TTL.id, RefreshToken: TTL.refresh,
      DeviceCode: TTL.device, AuthorizationCode: 60, Interaction: 3600, Session: 86400,
      Grant: Math.max(TTL.refresh, 86400),
    },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Error', Object.entries(out).map(([k, v]) => `<p>${esc(k)}: ${esc(v)}</p>`).join(''));
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true, allowedPolicy: async (ctx, client) => client.clientAuthMethod !== 'none' },
      revocation: { enabled: true, allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId },
      deviceFlow: {
        enabled: true,
        userCodeInputSource(ctx, form, out, err) {
          const button = '<button type="submit" form="op.deviceInputForm">Continue</button>';
          ctx.body = page('Device login', `${err ? '<p>Wrong or expired code.</p>' : ''}${form}${button}`);
        },
        userCodeConfirmSource(ctx, form, client, info, code) {
          const button = '<button type="submit" form="op.deviceConfirmForm">Continue</button>';
          const who = esc(client.clientName || client.clientId);
          ctx.body = page('Confirm device', `<p>${who} shows the code <code>${esc(code)}</code>.</p>${form}${button}`);
        },
        successSource(ctx) { ctx.body = page('Signed in', '<p>You can close this page.</p>'); },
      },
      resourceIndicators: { // every access token is a JWT for the relay (aud = --audience)
        enabled: true,
        defaultResource: async (ctx, client, oneOf) => ((!oneOf || oneOf.includes(RESOURCE)) ? RESOURCE : oneOf),
        useGrantedResource: async () => true,
        async getResourceServerInfo(ctx, indicator) {
          if (indicator !== RESOURCE) throw new errors.InvalidTarget();
          const sign = { alg: 'RS256' };
          return { scope: 'openid email profile groups', audience: AUDIENCE, accessTokenFormat: 'jwt', jwt: { sign } };
        },
      },
    },
  };
}

let provider;
let handle;
let issuer;
function build() {
  const next = new Provider(issuer, configuration());
  next.proxy = false;
  const events = ['authorization', 'device_authorization', 'grant', 'introspection', 'revocation'];
  for (const event of ['server_error', ...events.map((e) => `${e}.error`)]) {
    next.on(event, (ctx, err) => {
      console.error(`dev-idp ${event}: ${err.name}: ${err.message}${err.error_detail ? ` (${err.error_detail})` : ''}`);
    });
  }
  [provider, handle] = [next, next.callback()];
}

// --- login and consent pages ------------------------------------------------------------------
async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 16384) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}
function send(res, status, type, body) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(typeof body === 'string' ? body : `${JSON.stringify(body)}\n`);
}
const abortForm = (uid, label) => `<form id="abort" method="post" action="/interaction/${esc(uid)}/abort">`
  + `<button type="submit">${label}</button></form>`;
const loginForm = (uid, error) => page('Sign in', `${error ? `<p role="alert">${esc(error)}</p>` : ''}`
  + `<form id="login" method="post" action="/interaction/${esc(uid)}/login">`
  + '<p><label>Email <input name="login" type="email" autocomplete="username" autofocus required></label></p>'
  + '<p><label>Password <input name="password" type="password" autocomplete="current-password" required></label></p>'
  + `<button type="submit">Sign in</button></form>${abortForm(uid, 'Cancel')}`);
const consentForm = (uid, client, scope) => page('Authorize', `<p><b>${esc(client)}</b> asks for: ${esc(scope)}</p>`
  + `<form id="consent" method="post" action="/interaction/${esc(uid)}/confirm">`
  + `<button type="submit" autofocus>Allow</button></form>${abortForm(uid, 'Deny')}`);

async function interaction(req, res, url) {
  const [, , uid, action] = url.pathname.split('/');
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  const { prompt, params, session, grantId } = details;
  if (req.method === 'GET' && !action) {
    if (prompt.name === 'login') return send(res, 200, 'text/html', loginForm(uid));
    const client = await provider.Client.find(params.client_id);
    return send(res, 200, 'text/html', consentForm(uid, client.clientName || client.clientId, params.scope ?? ''));
  }
  if (req.method !== 'POST') return send(res, 405, 'text/plain', 'method not allowed\n');
  if (action === 'abort') {
    const result = { error: 'access_denied', error_description: 'End-User aborted interaction' };
    return provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
  }
  if (action === 'login' && prompt.name === 'login') {
    const form = await readForm(req);
    const user = findUser(form.get('login') ?? '');
    if (!user || !crypto.timingSafeEqual(digest(user.password), digest(form.get('password') ?? ''))) {
      return send(res, 401, 'text/html', loginForm(uid, 'Unknown user or wrong password.'));
    }
    const result = { login: { accountId: user.sub } };
    return provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
  }
  if (action === 'confirm' && prompt.name === 'consent') {
    const grant = grantId
      ? await provider.Grant.find(grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const { missingOIDCScope, missingOIDCClaims, missingResourceScopes } = prompt.details;
    if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
    if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const result = { consent: { grantId: await grant.save() } };
    return provider.interactionFinished(req, res, result, { mergeWithLastSubmission: true });
  }
  return send(res, 400, 'text/plain', `unexpected ${action} for prompt ${prompt.name}\n`);
}

// --- admin endpoints (loopback development only) ----------------------------------------------
async function admin(req, res, url) {
  const token = opt['admin-token'];
  if (token && !crypto.timingSafeEqual(digest(req.headers.authorization), digest(`Bearer ${token}`))) {
    return send(res, 401, 'application/json', { error: 'unauthorized' });
  }
  if (req.method !== 'POST') return send(res, 405, 'application/json', { error: 'method not allowed' });
  const q = url.searchParams;
  if (url.pathname === '/admin/rotate') {
    const alg = q.get('alg') || 'RS256';
    if (!['RS256', 'ES256'].includes(alg)) {
      return send(res, 400, 'application/json', { error: 'alg must be RS256 or ES256' });
    }
    const kid = newKey(alg);
    if (q.get('retire') === '1') { // drop the older keys of this algorithm from the JWKS
      keys.splice(0, keys.length, ...keys.filter((k) => k.alg !== alg || k.kid === kid));
    }
    build();
    return send(res, 200, 'application/json', { kid, kids: keys.map((k) => k.kid) });
  }
  const user = q.get('user') && findUser(q.get('user'));
  if (!user) return send(res, 404, 'application/json', { error: 'unknown user' });
  if (url.pathname === '/admin/revoke') {
    const grants = [...(grantsByUser.get(user.sub) ?? [])];
    for (const id of grants) {
      await adapter('Grant').revokeByGrantId(id);
      await adapter('Grant').destroy(id);
    }
    grantsByUser.delete(user.sub);
    return send(res, 200, 'application/json', { user: user.email, revoked_grants: grants.length });
  }
  if (url.pathname === '/admin/groups') {
    user.groups = q.getAll('group');
    return send(res, 200, 'application/json', { user: user.email, groups: user.groups });
  }
  return send(res, 404, 'application/json', { error: 'not found' });
}

const ROUTES = new Map([['interaction', interaction], ['admin', admin]]);
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const route = ROUTES.get(url.pathname.split('/')[1]);
  if (!route) return handle(req, res); // everything else is oidc-provider's
  return route(req, res, url).catch((err) => {
    console.error(`dev-idp ${url.pathname.split('/')[1]}: ${err.message}`);
    if (!res.headersSent) send(res, 400, 'text/html', page('Error', `<p>${esc(err.message)}</p>`));
  });
});
server.listen(Number(opt.port), opt.host, () => {
  const { port } = server.address();
  const host = opt.host.includes(':') ? `[${opt.host}]` : opt.host;
  issuer = opt.issuer || `http://${host}:${port}`;
  build();
  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
});
const stop = () => { server.close(); server.closeAllConnections(); process.exit(0); };
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (opt['exit-on-stdin-close']) { process.stdin.on('end', stop).on('error', stop).resume(); }
