// A real, independent OpenID Provider for Cairn's integration tests: panva's oidc-provider (OpenID
// Certified) on 127.0.0.1, configured entirely from the environment. Cairn signs users in through it
// as a relying party (authorization code + PKCE + nonce, ID token validation, userinfo).
//
//   PORT           port on 127.0.0.1 (default 0: any free port). Issuer: http://127.0.0.1:<port>
//   OIDC_CLIENTS   JSON array of client metadata (required), e.g.
//                  [{"client_id":"cairn","client_secret":"...","redirect_uris":["http://127.0.0.1:1234/cb"],
//                    "token_endpoint_auth_method":"client_secret_basic"}]
//                  client_secret_post and private_key_jwt (with an inline "jwks":{"keys":[...]}) work too.
//   OIDC_ACCOUNTS  JSON array of accounts (optional; default: the one account below), each
//                  {"sub","login","password", plus claims: "name","email","email_verified",...}
//
// stdout carries exactly one line once the provider serves requests: `listening http://127.0.0.1:<port>`.
// Everything else (oidc-provider's notices included) goes to stderr, and never a password, client
// secret, code or token. SIGTERM/SIGINT stop it cleanly (exit 0).
//
// Sign-in: GET /interaction/<uid> shows a login form (login, password, button #sign-in) that POSTs to
// /interaction/<uid>/login. A wrong login or password re-renders it with status 401 and
// "Invalid login or password". A right one finishes login (amr ["pwd"], acr urn:cairn:test:loa2) and
// consent (a Grant for the requested scopes; no consent screen) in one step: the browser is sent
// 303 -> /auth/<uid> -> 303 -> redirect_uri?code=...&state=...&iss=...
import * as crypto from 'node:crypto';
import * as http from 'node:http';

// oidc-provider prints its notices with console.info (stdout). stdout is reserved for the one
// `listening` line, so every console method writes to stderr; the line itself uses process.stdout.
for (const method of ['log', 'info', 'debug']) {
  console[method] = (...args) => console.error(...args);
}
// A parent that stops reading (closes its end of a pipe) must not crash the provider.
process.stdout.on('error', () => {});
process.stderr.on('error', () => {});

const ACR = 'urn:cairn:test:loa2';
const AMR = ['pwd'];
const DEFAULT_ACCOUNTS = [{
  sub: 'upstream-alice',
  login: 'alice',
  password: 'alice upstream password',
  name: 'Alice Upstream',
  email: 'alice@example.org',
  email_verified: true,
}];
// Claims per scope (OIDC Core 5.4). Only the ones an account has are released.
const SCOPE_CLAIMS = {
  profile: ['name', 'given_name', 'family_name', 'middle_name', 'nickname', 'preferred_username',
    'profile', 'picture', 'website', 'gender', 'birthdate', 'zoneinfo', 'locale', 'updated_at'],
  email: ['email', 'email_verified'],
};
const NOT_CLAIMS = new Set(['login', 'password']);

function log(message) {
  process.stderr.write(`[test-op] ${message}\n`);
}

function fail(message) {
  log(`error: ${message}`);
  process.exit(1);
}

function parseJsonArray(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw.trim() === '') {
    if (fallback === undefined) fail(`${name} is not set (a JSON array)`);
    return fallback;
  }
  let value;
  try {
    value = JSON.parse(raw);
  } catch (err) {
    fail(`${name} is not valid JSON: ${err.message}`);
  }
  if (!Array.isArray(value) || value.length === 0) fail(`${name} must be a non-empty JSON array`);
  for (const item of value) {
    if (item === null || typeof item !== 'object' || Array.isArray(item)) {
      fail(`${name} must be an array of objects`);
    }
  }
  return value;
}

const portText = process.env.PORT ?? '0';
if (!/^\d+$/.test(portText) || Number(portText) > 65535) fail(`PORT must be 0..65535, got "${portText}"`);
const clients = parseJsonArray('OIDC_CLIENTS');
for (const client of clients) {
  if (typeof client.client_id !== 'string' || client.client_id === '') fail('every OIDC_CLIENTS entry needs a client_id');
}
const accounts = parseJsonArray('OIDC_ACCOUNTS', DEFAULT_ACCOUNTS);
const accountsBySub = new Map();
for (const account of accounts) {
  if (typeof account.sub !== 'string' || account.sub === '') fail('every OIDC_ACCOUNTS entry needs a sub');
  if (typeof account.password !== 'string') fail(`OIDC_ACCOUNTS entry ${account.sub} needs a password`);
  if (accountsBySub.has(account.sub)) fail(`OIDC_ACCOUNTS has sub ${account.sub} twice`);
  accountsBySub.set(account.sub, account);
}

// Imported only now, after console is redirected: its module body may already print a notice.
const { default: Provider, errors: oidcErrors } = await import('oidc-provider');

function escapeHtml(value) {
  return String(value).replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  })[c]);
}

function sha256(text) {
  return crypto.createHash('sha256').update(String(text), 'utf8').digest();
}

function findByLogin(login, password) {
  for (const account of accounts) {
    const accountLogin = account.login ?? account.sub;
    // Compare digests in constant time; both fields are checked whatever the first one gave.
    const loginOk = crypto.timingSafeEqual(sha256(accountLogin), sha256(login));
    const passwordOk = crypto.timingSafeEqual(sha256(account.password), sha256(password));
    if (loginOk && passwordOk) return account;
  }
  return undefined;
}

function signingKeys() {
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  // RS256 first: it is the default ID token algorithm (clientDefaults below).
  return [
    { ...rsa, kid: `rs256-${crypto.randomBytes(6).toString('hex')}`, alg: 'RS256', use: 'sig' },
    { ...ec, kid: `es256-${crypto.randomBytes(6).toString('hex')}`, alg: 'ES256', use: 'sig' },
  ];
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body>
${body}
</body>
</html>
`;
}

function loginPage(uid, clientId, { login = '', error } = {}) {
  const action = `/interaction/${encodeURIComponent(uid)}/login`;
  return page('Sign in - Cairn test OpenID Provider', `<h1>Sign in</h1>
<p>Test OpenID Provider. Client: <code>${escapeHtml(clientId)}</code></p>
${error ? `<p id="error" role="alert">${escapeHtml(error)}</p>\n` : ''}<form method="post" action="${escapeHtml(action)}" autocomplete="off">
<p><label for="login">Login</label><br><input type="text" id="login" name="login" value="${escapeHtml(login)}" autofocus required></p>
<p><label for="password">Password</label><br><input type="password" id="password" name="password" required></p>
<p><button type="submit" id="sign-in">Sign in</button></p>
</form>`);
}

async function readForm(req, limit = 64 * 1024) {
  const type = String(req.headers['content-type'] || '').split(';')[0].trim().toLowerCase();
  if (type !== 'application/x-www-form-urlencoded') {
    throw new oidcErrors.InvalidRequest('only application/x-www-form-urlencoded is accepted', 415);
  }
  let size = 0;
  const chunks = [];
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new oidcErrors.InvalidRequest('request body too large', 413);
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

const server = http.createServer((req, res) => {
  // Only until the provider exists (between listen and the `listening` line).
  res.statusCode = 503;
  res.end();
});
server.on('clientError', (err, socket) => {
  if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
});

await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(Number(portText), '127.0.0.1', () => {
    server.off('error', reject);
    resolve();
  });
}).catch((err) => fail(`cannot listen on 127.0.0.1:${portText}: ${err.message}`));

const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients,
  clientDefaults: {
    grant_types: ['authorization_code'],
    response_types: ['code'],
    id_token_signed_response_alg: 'RS256',
    token_endpoint_auth_method: 'client_secret_basic',
  },
  jwks: { keys: signingKeys() },
  cookies: {
    keys: [crypto.randomBytes(32).toString('base64url'), crypto.randomBytes(32).toString('base64url')],
  },
  // Authorization code flow only (no implicit or hybrid response types).
  responseTypes: ['code'],
  scopes: ['openid', 'profile', 'email', 'offline_access'],
  claims: {
    // acr, amr and auth_time (from the login) are tied to `openid` so that every ID token carries
    // them. As standalone claims (`acr: null`) the library releases them only when the client asks
    // (acr_values, max_age, the claims parameter). They are not in userinfo.
    openid: ['sub', 'acr', 'amr', 'auth_time'],
    profile: SCOPE_CLAIMS.profile,
    email: SCOPE_CLAIMS.email,
    sid: null,
    iss: null,
  },
  acrValues: [ACR],
  features: {
    devInteractions: { enabled: false },
    userinfo: { enabled: true },
    revocation: { enabled: true },
  },
  pkce: { required: () => true },
  ttl: {
    AuthorizationCode: 60,
    IdToken: 300,
    AccessToken: 300,
    RefreshToken: 24 * 60 * 60,
    // The library's defaults, set explicitly so it does not print a notice for each.
    Interaction: 60 * 60,
    Session: 14 * 24 * 60 * 60,
    Grant: 14 * 24 * 60 * 60,
  },
  enabledJWA: {
    idTokenSigningAlgValues: ['RS256', 'ES256'],
    userinfoSigningAlgValues: ['RS256', 'ES256'],
  },
  interactions: {
    url: (ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  clientBasedCORS: () => false,
  async findAccount(ctx, sub) {
    const account = accountsBySub.get(sub);
    if (!account) return undefined;
    return {
      accountId: sub,
      // The provider keeps only the claims the granted scopes (and `claims` above) allow.
      async claims() {
        const claims = {};
        for (const [key, value] of Object.entries(account)) {
          if (!NOT_CLAIMS.has(key)) claims[key] = value;
        }
        claims.sub = sub;
        return claims;
      },
    };
  },
  async renderError(ctx, out) {
    ctx.type = 'html';
    const rows = Object.entries(out)
      .map(([key, value]) => `<p><strong>${escapeHtml(key)}</strong>: <span id="${escapeHtml(key)}">${escapeHtml(value)}</span></p>`)
      .join('\n');
    ctx.body = page('Error - Cairn test OpenID Provider', `<h1>Error</h1>\n${rows}`);
  },
});

// Logs: method, path (never the query: it carries codes and state) and status; errors by name.
provider.use(async (ctx, next) => {
  const started = Date.now();
  try {
    await next();
  } finally {
    log(`${ctx.method} ${ctx.path} ${ctx.status} ${Date.now() - started}ms`);
  }
});
for (const event of ['authorization.error', 'grant.error', 'userinfo.error', 'revocation.error',
  'discovery.error', 'jwks.error', 'end_session.error', 'introspection.error', 'backchannel.error',
  'pushed_authorization_request.error', 'check_session.error']) {
  provider.on(event, (ctx, err) => {
    const detail = err.error_detail ? ` (${err.error_detail})` : '';
    log(`${event}: ${err.error || err.name}: ${err.error_description || err.message}${detail}`);
  });
}
provider.on('server_error', (ctx, err) => log(`server_error: ${err.stack || err}`));

// A Grant for everything the interaction asks for: consent is given without asking.
async function grantFor(details, accountId) {
  const { Grant } = provider;
  let grant;
  if (details.grantId && details.session?.accountId === accountId) {
    grant = await Grant.find(details.grantId);
  }
  grant ||= new Grant({ accountId, clientId: details.params.client_id });
  if (details.params.scope) grant.addOIDCScope(details.params.scope);
  const promptDetails = details.prompt?.details ?? {};
  if (promptDetails.missingOIDCScope) grant.addOIDCScope(promptDetails.missingOIDCScope.join(' '));
  if (promptDetails.missingOIDCClaims) grant.addOIDCClaims(promptDetails.missingOIDCClaims);
  if (details.params.claims) {
    try {
      const requested = JSON.parse(details.params.claims);
      grant.addOIDCClaims([...Object.keys(requested.id_token ?? {}), ...Object.keys(requested.userinfo ?? {})]);
    } catch { /* the provider validated it already */ }
  }
  for (const [indicator, scopes] of Object.entries(promptDetails.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  return grant.save();
}

function noStore(ctx) {
  ctx.set('cache-control', 'no-store');
  ctx.set('pragma', 'no-cache');
}

function redirect303(ctx, location) {
  ctx.status = 303;
  ctx.redirect(location);
}

// The interaction routes (instead of devInteractions): a login form, consent given automatically.
provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([^/]+)(\/login)?$/.exec(ctx.path);
  if (!match) return next();
  const [, uid, login] = match;
  noStore(ctx);
  try {
    if (!login && ctx.method === 'GET') {
      const details = await provider.interactionDetails(ctx.req, ctx.res);
      if (details.uid !== uid) throw new oidcErrors.InvalidRequest('interaction mismatch (stale page?)');
      if (details.prompt.name === 'login') {
        ctx.type = 'html';
        ctx.body = loginPage(uid, details.params.client_id);
        return undefined;
      }
      if (details.prompt.name === 'consent') {
        // Already signed in here: consent to what is asked, without a page.
        const grantId = await grantFor(details, details.session.accountId);
        log(`consent given for ${details.session.accountId} to client ${details.params.client_id}`);
        return redirect303(ctx, await provider.interactionResult(ctx.req, ctx.res, { consent: { grantId } }));
      }
      throw new oidcErrors.InvalidRequest(`unsupported prompt ${details.prompt.name}`);
    }
    if (login && ctx.method === 'POST') {
      const details = await provider.interactionDetails(ctx.req, ctx.res);
      if (details.uid !== uid) throw new oidcErrors.InvalidRequest('interaction mismatch (stale page?)');
      if (details.prompt.name !== 'login') throw new oidcErrors.InvalidRequest('no login pending');
      const form = await readForm(ctx.req);
      const loginName = form.get('login') ?? '';
      const account = findByLogin(loginName, form.get('password') ?? '');
      if (!account) {
        // Never the submitted text itself: it might be a password typed into the wrong field.
        const known = accounts.find((a) => (a.login ?? a.sub) === loginName);
        log(`login failed: ${known ? `wrong password for ${known.sub}` : 'unknown login'} (client ${details.params.client_id})`);
        ctx.status = 401;
        ctx.type = 'html';
        ctx.body = loginPage(uid, details.params.client_id, { login: loginName, error: 'Invalid login or password' });
        return undefined;
      }
      const grantId = await grantFor(details, account.sub);
      log(`login ok: ${account.sub} to client ${details.params.client_id}`);
      const returnTo = await provider.interactionResult(ctx.req, ctx.res, {
        login: { accountId: account.sub, amr: AMR, acr: ACR },
        consent: { grantId },
      }, { mergeWithLastSubmission: false });
      return redirect303(ctx, returnTo);
    }
    ctx.status = 405;
    ctx.set('allow', login ? 'POST' : 'GET');
    return undefined;
  } catch (err) {
    const status = err.statusCode || err.status || 500;
    if (status >= 500) log(`interaction error: ${err.stack || err}`);
    else log(`interaction error: ${err.error || err.name}: ${err.error_description || err.message}`);
    ctx.status = status;
    ctx.type = 'html';
    ctx.body = page('Error - Cairn test OpenID Provider', `<h1>Error</h1>
<p><strong>error</strong>: <span id="error">${escapeHtml(err.error || 'server_error')}</span></p>
<p><strong>error_description</strong>: <span id="error_description">${escapeHtml(err.error_description || 'interaction failed')}</span></p>`);
    return undefined;
  }
});

// Validate the client metadata now, so a bad OIDC_CLIENTS fails at start and not at the first request.
for (const client of clients) {
  try {
    await provider.Client.find(client.client_id);
  } catch (err) {
    fail(`OIDC_CLIENTS: client ${client.client_id}: ${err.error_description || err.message}`);
  }
}

const handler = provider.callback();
server.removeAllListeners('request');
server.on('request', handler);

let stopping = false;
function stop(signal) {
  if (stopping) return;
  stopping = true;
  log(`${signal}: stopping`);
  server.close(() => process.exit(0));
  server.closeIdleConnections();
  setTimeout(() => {
    server.closeAllConnections();
    process.exit(0);
  }, 2000).unref();
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));

log(`issuer ${issuer}; clients: ${clients.map((c) => c.client_id).join(', ')}; accounts: ${accounts.map((a) => a.sub).join(', ')}`);
process.stdout.write(`listening ${issuer}\n`);
