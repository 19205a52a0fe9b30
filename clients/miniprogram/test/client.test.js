// Tests of clients/miniprogram/wx-gateway.js against the REAL gateway, started here in demo mode
// (`python -m gateway.testing.demo`: embedded Redis, WeChat simulator, echo upstream under /api/).
// A fake `wx` global stands in for the mini-program runtime: wx.login hands out a fresh code
// per call and counts calls, wx.request makes real HTTP requests with node:http, storage is
// in memory.
//
//   WXGW_PYTHON=.venv/bin/python node --test clients/miniprogram/test/
'use strict'

const { describe, it, before, after, beforeEach } = require('node:test')
const assert = require('node:assert/strict')
const { spawn } = require('node:child_process')
// The demo serves a WeChat and a Douyin app: a login must name its app.
const DEMO_APPID = 'wxdemo0000000001'
const http = require('node:http')
const net = require('node:net')
const path = require('node:path')

const { createClient, WxGatewayError, DEFAULT_STORAGE_KEY } = require('../wx-gateway.js')

const ROOT = path.resolve(__dirname, '..', '..', '..')
const PYTHON = process.env.WXGW_PYTHON || 'python3'
const STARTUP_TIMEOUT_MS = 20000

// ---------------------------------------------------------------------------------------------
// The gateway process

let gateway = null
let gatewayOutput = ''
let baseURL = ''

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer()
    server.unref()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
  })
}

function killGatewayNow() {
  if (gateway && gateway.exitCode === null && gateway.signalCode === null) {
    try { gateway.kill('SIGKILL') } catch (e) { /* already gone */ }
  }
}

// Whatever ends this process, the gateway goes with it.
process.on('exit', killGatewayNow)
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(signal, () => { killGatewayNow(); process.exit(1) })
}

function keepOutput(chunk) {
  gatewayOutput += chunk.toString()
  if (gatewayOutput.length > 20000) gatewayOutput = gatewayOutput.slice(-20000)
}

async function startGateway() {
  const port = await freePort()
  const child = spawn(PYTHON, ['-m', 'gateway.testing.demo', '--port', String(port)], {
    cwd: ROOT,
    env: Object.assign({}, process.env, { PYTHONUNBUFFERED: '1' }),
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  gateway = child
  await new Promise((resolve, reject) => {
    let seen = ''
    const timer = setTimeout(() => {
      fail(new Error(`the gateway did not start within ${STARTUP_TIMEOUT_MS} ms`))
    }, STARTUP_TIMEOUT_MS)
    function fail(err) {
      clearTimeout(timer)
      killGatewayNow()
      err.message += `\n--- ${PYTHON} -m gateway.testing.demo output ---\n${gatewayOutput}`
      reject(err)
    }
    child.on('error', (err) => fail(new Error(`cannot run ${PYTHON}: ${err.message} (set WXGW_PYTHON)`)))
    child.on('exit', (code, signal) => {
      if (!seen.includes('Press Ctrl+C')) fail(new Error(`the gateway exited early (${code === null ? signal : code})`))
    })
    child.stderr.on('data', keepOutput) // access log lines: always drained
    child.stdout.on('data', (chunk) => {
      keepOutput(chunk)
      if (seen.includes('Press Ctrl+C')) return
      seen += chunk.toString()
      if (seen.includes('Press Ctrl+C')) {
        clearTimeout(timer)
        resolve()
      }
    })
  })
  baseURL = `http://127.0.0.1:${port}`
}

async function stopGateway() {
  const child = gateway
  if (!child || child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.kill('SIGINT')
  const timer = setTimeout(() => killGatewayNow(), 5000)
  await exited
  clearTimeout(timer)
}

// ---------------------------------------------------------------------------------------------
// A fake `wx`

/** An HTTP exchange with node:http, returning {statusCode, header, text}. */
function httpExchange(method, url, headers, body, timeoutMs) {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, headers, agent: false, timeout: timeoutMs }, (res) => {
      const chunks = []
      res.on('data', (c) => chunks.push(c))
      res.on('end', () => resolve({
        statusCode: res.statusCode, header: res.headers, text: Buffer.concat(chunks).toString('utf8'),
      }))
      res.on('error', reject)
    })
    req.on('timeout', () => req.destroy(new Error('timeout')))
    req.on('error', reject)
    if (body !== undefined) req.write(body)
    req.end()
  })
}

function makeWx(options = {}) {
  const state = {
    logins: 0,
    codes: [],
    requests: [], // {method, url, header, body}
    storage: new Map(),
    /** The code the n-th wx.login call (1-based) hands out. */
    codeFor: options.codeFor || ((n) => `js-client-${process.pid}-${Date.now()}-${n}`),
    /** Awaited before each request is sent (may call the gateway directly). */
    beforeSend: null,
  }
  const wx = {
    login({ success, fail, complete } = {}) {
      state.logins += 1
      const code = state.codeFor(state.logins)
      state.codes.push(code)
      setImmediate(() => {
        if (code === null) {
          if (fail) fail({ errMsg: 'login:fail simulated' })
        } else if (success) {
          success({ code, errMsg: 'login:ok' })
        }
        if (complete) complete()
      })
    },
    request(opts) {
      const method = (opts.method || 'GET').toUpperCase()
      const header = Object.assign({}, opts.header || {})
      let url = opts.url
      let body
      const contentType = Object.keys(header).find((k) => k.toLowerCase() === 'content-type')
      if (!contentType) header['content-type'] = 'application/json'
      const ct = header[contentType || 'content-type']
      if (opts.data !== undefined && opts.data !== null) {
        if (method === 'GET' && typeof opts.data === 'object') {
          const qs = new URLSearchParams(opts.data).toString()
          if (qs) url += (url.includes('?') ? '&' : '?') + qs
        } else if (typeof opts.data === 'string' || Buffer.isBuffer(opts.data)) {
          body = opts.data
        } else if (/application\/x-www-form-urlencoded/i.test(ct)) {
          body = new URLSearchParams(opts.data).toString()
        } else {
          body = JSON.stringify(opts.data)
        }
      }
      const record = { method, url, header, body }
      state.requests.push(record)
      Promise.resolve(state.beforeSend && state.beforeSend(record))
        .then(() => httpExchange(method, url, header, body, opts.timeout || 10000))
        .then((res) => {
          let data = res.text
          if ((opts.dataType || 'json') === 'json') {
            try { data = JSON.parse(res.text) } catch (e) { /* stays a string, like wx */ }
          }
          if (opts.success) opts.success({ data, statusCode: res.statusCode, header: res.header, cookies: [], errMsg: 'request:ok' })
          if (opts.complete) opts.complete()
        }, (err) => {
          if (opts.fail) opts.fail({ errMsg: `request:fail ${err.message}` })
          if (opts.complete) opts.complete()
        })
      return { abort() {} }
    },
    setStorageSync(key, value) { state.storage.set(key, value) },
    getStorageSync(key) { return state.storage.has(key) ? state.storage.get(key) : '' },
    removeStorageSync(key) { state.storage.delete(key) },
  }
  state.api = wx
  if (options.global !== false) globalThis[options.globalName || 'wx'] = wx
  return state
}

/** QQ's `qq`: wx's shapes under another global (qq.login gives {code}). */
function makeQq(options = {}) {
  return makeWx(Object.assign({ globalName: 'qq' }, options))
}

/**
 * Douyin's `tt`: wx's shapes; tt.login also gives `anonymousCode` and `isLogin`, and for a user
 * not logged in to the Douyin app only `anonymousCode` (options.loggedIn === false).
 */
function makeTt(options = {}) {
  const state = makeWx(Object.assign({ globalName: 'tt' }, options))
  const inner = state.api.login
  state.anonymousCodes = []
  state.api.login = (opts = {}) => inner(Object.assign({}, opts, {
    success: (res) => {
      const anonymousCode = `anon-${res.code}`
      state.anonymousCodes.push(anonymousCode)
      const loggedIn = options.loggedIn !== false
      opts.success(loggedIn ? { code: res.code, anonymousCode, isLogin: true, errMsg: 'login:ok' }
        : { anonymousCode, isLogin: false, errMsg: 'login:ok' })
    },
  }))
  return state
}

/**
 * Alipay's `my`, in its own shapes: no login() but getAuthCode({scopes}) giving {authCode};
 * my.request takes `headers`, answers {data, status, headers}, and fails on an HTTP error status
 * with the answer in the failure; storage takes {key, data} objects.
 */
function makeMy(options = {}) {
  const state = makeWx(Object.assign({}, options, { global: false }))
  const wx = state.api
  state.scopes = []
  state.headerKeys = []
  const my = {
    getAuthCode(opts = {}) {
      state.scopes.push(opts.scopes)
      wx.login({
        success: (res) => opts.success && opts.success({ authCode: res.code, authErrorScopes: {}, authSuccessScopes: ['auth_base'] }),
        fail: () => opts.fail && opts.fail({ error: 11, errorMessage: '用户取消操作' }),
      })
    },
    request(opts) {
      state.headerKeys.push(Object.keys(opts).filter((k) => k === 'header' || k === 'headers'))
      return wx.request(Object.assign({}, opts, {
        header: opts.headers,
        success: (res) => {
          const answer = { data: res.data, status: res.statusCode, headers: res.header }
          if (res.statusCode >= 400) opts.fail(Object.assign({ error: 19, errorMessage: 'http status error' }, answer))
          else opts.success(answer)
        },
        fail: (err) => opts.fail({ error: 12, errorMessage: err.errMsg }),
      }))
    },
    getStorageSync({ key }) { return { data: state.storage.has(key) ? state.storage.get(key) : null } },
    setStorageSync({ key, data }) { state.storage.set(key, data) },
    removeStorageSync({ key }) { state.storage.delete(key) },
  }
  state.api = my
  if (options.global !== false) globalThis.my = my
  return state
}

/** `wx` inside the WeCom client: wx.qy.login gives WeCom's code, wx.login still WeChat's. */
function makeWecom(options = {}) {
  const state = makeWx(options)
  state.qyLogins = 0
  const login = state.api.login
  state.api.qy = {
    login(opts = {}) {
      state.qyLogins += 1
      login(opts)
    },
  }
  state.api.login = (opts) => { state.wxLogins = (state.wxLogins || 0) + 1; login(opts) }
  return state
}

/**
 * uni-app's API object: wx's shapes (uni.request / uni.login / uni.*StorageSync with
 * success/fail/complete); given callbacks, it returns a RequestTask, not a promise. Never global `wx`.
 */
function makeUni(options = {}) {
  const state = makeWx(Object.assign({}, options, { global: false }))
  const uni = Object.assign({}, state.api)
  state.api = uni
  return state
}

/**
 * Taro's API object: the same callbacks, and each call also returns a promise that rejects
 * when the call fails (Taro promisifies its APIs). Never global `wx`.
 */
function makeTaro(options = {}) {
  const state = makeWx(Object.assign({}, options, { global: false }))
  const inner = state.api
  function promised(name) {
    return (opts) => new Promise((resolve, reject) => {
      inner[name](Object.assign({}, opts, {
        success: (res) => { if (opts.success) opts.success(res); resolve(res) },
        fail: (err) => { if (opts.fail) opts.fail(err); reject(err) },
      }))
    })
  }
  state.api = Object.assign({}, inner, { request: promised('request'), login: promised('login') })
  return state
}

/** Requests the client made to a path (query ignored). */
function requestsTo(state, pathname) {
  return state.requests.filter((r) => new URL(r.url).pathname === pathname)
}

function rawCall(method, pathname, token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {}
  return httpExchange(method, baseURL + pathname, headers, undefined, 5000).then((res) => {
    let json = null
    try { json = JSON.parse(res.text) } catch (e) { /* empty */ }
    return { statusCode: res.statusCode, json }
  })
}

// ---------------------------------------------------------------------------------------------

describe('wx-gateway mini-program client against the real gateway', { timeout: 28000 }, () => {
  before(startGateway, { timeout: STARTUP_TIMEOUT_MS + 2000 })
  after(stopGateway, { timeout: 8000 })
  beforeEach(() => { for (const name of ['wx', 'qq', 'tt', 'my']) delete globalThis[name] })

  it('login() calls wx.login, POSTs the code, stores the token and returns openid', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL: baseURL + '/' })
    assert.equal(client.token(), null)
    const body = await client.login()
    assert.equal(wx.logins, 1)
    assert.match(body.openid, /^o/)
    assert.equal(body.token_type, 'Bearer')
    assert.equal(typeof body.expires_in, 'number')
    assert.ok('unionid' in body)
    assert.equal(wx.storage.get(DEFAULT_STORAGE_KEY), body.token)
    assert.equal(client.token(), body.token)
    const [sent] = requestsTo(wx, '/auth/login')
    assert.equal(sent.method, 'POST')
    assert.deepEqual(JSON.parse(sent.body), { code: wx.codes[0], appid: DEMO_APPID })
  })

  it('login() honours appid and storageKey', async () => {
    const wx = makeWx()
    const client = createClient({ baseURL, appid: 'wxdemo0000000001', storageKey: 'my_token' })
    const body = await client.login()
    assert.equal(wx.storage.get('my_token'), body.token)
    assert.equal(wx.storage.has(DEFAULT_STORAGE_KEY), false)
    assert.equal(JSON.parse(requestsTo(wx, '/auth/login')[0].body).appid, 'wxdemo0000000001')
  })

  it('request() sends the Bearer token and the upstream sees X-WX-OpenID, not the token', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    const { openid, token } = await client.login()
    const res = await client.request({ url: '/api/x', data: { page: 2 }, header: { 'X-WX-OpenID': 'forged', authorization: 'Bearer nope' } })
    assert.equal(res.statusCode, 200)
    assert.equal(res.errMsg, 'request:ok')
    assert.equal(res.data.path, '/api/x')
    assert.equal(res.data.query, 'page=2')
    assert.equal(res.data.headers['X-WX-OpenID'], openid)
    assert.equal(res.data.headers.Authorization, undefined)
    const [sent] = requestsTo(wx, '/api/x')
    assert.equal(sent.header.Authorization, `Bearer ${token}`)
    assert.equal(Object.keys(sent.header).filter((k) => k.toLowerCase() === 'authorization').length, 1)
    assert.equal(wx.logins, 1)
  })

  it('request() without a stored token logs in first, once', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    const results = await Promise.all([1, 2, 3].map((i) => client.request({ url: `${baseURL}/api/first?i=${i}` })))
    for (const res of results) assert.equal(res.statusCode, 200)
    assert.equal(wx.logins, 1)
    assert.equal(requestsTo(wx, '/api/first').length, 3)
  })

  it('logout() ends the session: the stored token is gone and the old token gets 401', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    const { token } = await client.login()
    assert.equal((await rawCall('GET', '/api/x', token)).statusCode, 200)
    await client.logout()
    assert.equal(wx.storage.has(DEFAULT_STORAGE_KEY), false)
    assert.equal(client.token(), null)
    const [sent] = requestsTo(wx, '/auth/logout')
    assert.equal(sent.header.Authorization, `Bearer ${token}`)
    const after = await rawCall('GET', '/api/x', token)
    assert.equal(after.statusCode, 401)
    assert.equal(after.json.error, 'unauthorized')
    await client.logout() // nothing stored: resolves without calling the gateway
    assert.equal(requestsTo(wx, '/auth/logout').length, 1)
  })

  it('logout() clears the stored token even when the call fails, and rejects', async () => {
    const wx = makeWx()
    const dead = `http://127.0.0.1:${await freePort()}`
    const client = createClient({ appid: DEMO_APPID, baseURL: dead })
    wx.storage.set(DEFAULT_STORAGE_KEY, 'some-token')
    await assert.rejects(client.logout(), (err) => {
      assert.ok(err instanceof WxGatewayError)
      assert.equal(err.statusCode, 0)
      assert.equal(err.error, 'network_error')
      return true
    })
    assert.equal(wx.storage.has(DEFAULT_STORAGE_KEY), false)
  })

  it('an invalid token: 10 concurrent requests cause exactly ONE wx.login and all succeed', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    wx.storage.set(DEFAULT_STORAGE_KEY, 'garbage.not-a.token')
    const results = await Promise.all(
      Array.from({ length: 10 }, (_, i) => client.request({ url: `/api/concurrent?i=${i}` })))
    assert.equal(wx.logins, 1)
    assert.equal(requestsTo(wx, '/auth/login').length, 1)
    const token = client.token()
    assert.notEqual(token, 'garbage.not-a.token')
    const openids = new Set()
    results.forEach((res, i) => {
      assert.equal(res.statusCode, 200)
      assert.equal(res.data.query, `i=${i}`)
      openids.add(res.data.headers['X-WX-OpenID'])
    })
    assert.equal(openids.size, 1)
    const sent = requestsTo(wx, '/api/concurrent')
    assert.equal(sent.length, 20) // each request: once with the garbage token, once retried
    assert.equal(sent.filter((r) => r.header.Authorization === 'Bearer garbage.not-a.token').length, 10)
    assert.equal(sent.filter((r) => r.header.Authorization === `Bearer ${token}`).length, 10)
  })

  it('401s that arrive after the re-login finished reuse it instead of logging in again', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    wx.storage.set(DEFAULT_STORAGE_KEY, 'garbage-token')
    // Hold back every request but the first until the re-login it causes has stored its token.
    wx.beforeSend = async (req) => {
      const url = new URL(req.url)
      if (url.pathname === '/api/late401' && url.searchParams.get('i') !== '0' &&
          req.header.Authorization === 'Bearer garbage-token') {
        while (wx.storage.get(DEFAULT_STORAGE_KEY) === 'garbage-token') await new Promise((r) => setTimeout(r, 5))
        await new Promise((r) => setTimeout(r, 20))
      }
    }
    const results = await Promise.all(
      Array.from({ length: 5 }, (_, i) => client.request({ url: `/api/late401?i=${i}` })))
    for (const res of results) assert.equal(res.statusCode, 200)
    assert.equal(wx.logins, 1)
  })

  it('a request that had to log in first does not log in again on a 401', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    wx.beforeSend = async (req) => {
      const auth = req.header.Authorization || ''
      if (new URL(req.url).pathname === '/api/w') {
        await rawCall('POST', '/auth/logout', auth.slice('Bearer '.length))
      }
    }
    const res = await client.request({ url: '/api/w' })
    assert.equal(res.statusCode, 401)
    assert.equal(wx.logins, 1)
    assert.equal(requestsTo(wx, '/api/w').length, 1)
  })

  it('a 401 after the token was renewed by an explicit login() reuses it', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    wx.storage.set(DEFAULT_STORAGE_KEY, 'stale-token')
    // The stale request leaves while the login runs, and its 401 comes back after it ended.
    wx.beforeSend = async (req) => {
      if (req.header.Authorization === 'Bearer stale-token') {
        while (wx.storage.get(DEFAULT_STORAGE_KEY) === 'stale-token') await new Promise((r) => setTimeout(r, 5))
      }
    }
    const pending = client.request({ url: '/api/late' })
    const body = await client.login()
    const res = await pending
    assert.equal(res.statusCode, 200)
    assert.equal(res.data.headers['X-WX-OpenID'], body.openid)
    assert.equal(wx.logins, 1)
  })

  it('a failing re-login rejects with the gateway error and does not loop', async () => {
    const wx = makeWx({ codeFor: () => 'errcode-40029-x' })
    const client = createClient({ appid: DEMO_APPID, baseURL })
    wx.storage.set(DEFAULT_STORAGE_KEY, 'expired-token')
    const all = [1, 2, 3].map(() => client.request({ url: '/api/y' }))
    for (const pending of all) {
      await assert.rejects(pending, (err) => {
        assert.ok(err instanceof WxGatewayError)
        assert.ok(err instanceof Error)
        assert.equal(err.statusCode, 401)
        assert.equal(err.error, 'invalid_code')
        assert.equal(typeof err.message, 'string')
        assert.ok(err.message.length > 0)
        return true
      })
    }
    assert.equal(wx.logins, 1)
    assert.equal(requestsTo(wx, '/auth/login').length, 1)
    assert.equal(requestsTo(wx, '/api/y').length, 3) // no retry without a token
    assert.equal(client.token(), 'expired-token')
  })

  it('a second 401 after a successful re-login is returned to the caller, not looped', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    wx.storage.set(DEFAULT_STORAGE_KEY, 'expired-token')
    // Before the retry goes out, end the brand-new session behind the client's back.
    wx.beforeSend = async (req) => {
      const auth = req.header.Authorization || ''
      if (new URL(req.url).pathname === '/api/z' && auth !== 'Bearer expired-token') {
        const res = await rawCall('POST', '/auth/logout', auth.slice('Bearer '.length))
        assert.equal(res.statusCode, 204)
      }
    }
    const res = await client.request({ url: '/api/z' })
    assert.equal(res.statusCode, 401)
    assert.equal(res.data.error, 'unauthorized')
    assert.equal(wx.logins, 1)
    assert.equal(requestsTo(wx, '/api/z').length, 2)
  })

  it('getPhoneNumber() exchanges the button code for the phone number', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    await client.login()
    const phone = await client.getPhoneNumber({ type: 'getphonenumber', detail: { code: 'abc', errMsg: 'getPhoneNumber:ok' } })
    assert.match(phone.pure_phone_number, /^\d{11}$/)
    assert.ok(phone.phone_number.endsWith(phone.pure_phone_number))
    assert.equal(typeof phone.country_code, 'string')
    const [sent] = requestsTo(wx, '/auth/phone')
    assert.deepEqual(JSON.parse(sent.body), { code: 'abc' })
    assert.match(sent.header.Authorization, /^Bearer /)
    // The demo keeps the verified number in the session and sends it upstream.
    const echo = await client.request({ url: '/api/me' })
    assert.equal(echo.data.headers['X-WX-Phone'], phone.phone_number)
  })

  it('getPhoneNumber() rejects a denied button event without calling the gateway', async () => {
    const wx = makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    await assert.rejects(
      client.getPhoneNumber({ detail: { errMsg: 'getPhoneNumber:fail user deny' } }),
      (err) => {
        assert.ok(err instanceof WxGatewayError)
        assert.equal(err.statusCode, 0)
        assert.equal(err.error, 'user_denied')
        assert.match(err.message, /user deny/)
        assert.equal(err.errMsg, 'getPhoneNumber:fail user deny')
        return true
      })
    await assert.rejects(client.getPhoneNumber(undefined), { error: 'user_denied' })
    assert.equal(wx.requests.length, 0)
    assert.equal(wx.logins, 0)
  })

  it('errors carry statusCode, error and message', async () => {
    // The gateway's error body.
    let wx = makeWx({ codeFor: () => 'errcode-40226-x' })
    let client = createClient({ appid: DEMO_APPID, baseURL })
    await assert.rejects(client.login(), (err) => {
      assert.ok(err instanceof Error)
      assert.equal(err.name, 'WxGatewayError')
      assert.equal(err.statusCode, 403)
      assert.equal(err.error, 'user_blocked')
      assert.ok(err.message && err.message !== 'user_blocked')
      assert.equal(err.response.statusCode, 403)
      return true
    })
    assert.equal(client.token(), null)

    // A phone code WeChat refuses.
    wx = makeWx()
    client = createClient({ appid: DEMO_APPID, baseURL })
    await client.login()
    await assert.rejects(client.getPhoneNumber({ detail: { code: 'errcode-40029-x' } }),
      { statusCode: 400, error: 'invalid_phone_code' })

    // wx.login itself failing.
    wx = makeWx({ codeFor: () => null })
    client = createClient({ appid: DEMO_APPID, baseURL })
    await assert.rejects(client.login(), { statusCode: 0, error: 'wx_login_failed', message: 'login:fail simulated' })

    // The network failing: rejected, not resolved.
    wx = makeWx()
    client = createClient({ appid: DEMO_APPID, baseURL: `http://127.0.0.1:${await freePort()}` })
    wx.storage.set(DEFAULT_STORAGE_KEY, 'some-token')
    await assert.rejects(client.request({ url: '/api/x' }), (err) => {
      assert.equal(err.statusCode, 0)
      assert.equal(err.error, 'network_error')
      assert.match(err.message, /^request:fail/)
      return true
    })

    // The token is never sent to another host.
    client = createClient({ appid: DEMO_APPID, baseURL })
    await assert.rejects(client.request({ url: 'https://example.com/api/x' }), { statusCode: 0, error: 'invalid_url' })
    assert.equal(wx.requests.length, 1)
  })

  it('other statuses are resolved like wx.request does', async () => {
    makeWx()
    const client = createClient({ appid: DEMO_APPID, baseURL })
    const res = await client.request({ url: '/nowhere' })
    assert.equal(res.statusCode, 404)
    assert.equal(res.data.error, 'not_found')
  })
  for (const [name, make] of [['uni', makeUni], ['Taro', makeTaro]]) {
    it(`platform: ${name} logs in, sends the token, logs out, without any global wx`, async () => {
      const platform = make()
      assert.equal(typeof globalThis.wx, 'undefined')
      const client = createClient({ appid: DEMO_APPID, baseURL, platform: platform.api })
      const body = await client.login()
      assert.equal(platform.logins, 1)
      assert.equal(platform.storage.get(DEFAULT_STORAGE_KEY), body.token)
      const res = await client.request({ url: '/api/echo' })
      assert.equal(res.statusCode, 200)
      assert.equal(res.data.headers['X-WX-OpenID'], body.openid)
      const [sent] = requestsTo(platform, '/api/echo')
      assert.equal(sent.header.Authorization, `Bearer ${body.token}`)
      await client.logout()
      assert.equal(platform.storage.has(DEFAULT_STORAGE_KEY), false)
      assert.equal((await rawCall('GET', '/auth/session', body.token)).statusCode, 401)
      assert.equal(typeof globalThis.wx, 'undefined')
    })

    it(`platform: ${name}: a failed request or login rejects once, with nothing unhandled`, async () => {
      const unhandled = []
      const onUnhandled = (reason) => unhandled.push(reason)
      process.on('unhandledRejection', onUnhandled)
      try {
        const platform = make({ codeFor: () => null }) // wx.login fails
        const client = createClient({ appid: DEMO_APPID, baseURL, platform: platform.api })
        await assert.rejects(client.login(), { statusCode: 0, error: 'wx_login_failed' })
        platform.storage.set(DEFAULT_STORAGE_KEY, 'some-token')
        const closed = createClient({ appid: DEMO_APPID, baseURL: `http://127.0.0.1:${await freePort()}`, platform: platform.api })
        await assert.rejects(closed.request({ url: '/api/x' }), { statusCode: 0, error: 'network_error' })
        await new Promise((resolve) => setTimeout(resolve, 50))
        assert.deepEqual(unhandled, [])
      } finally {
        process.removeListener('unhandledRejection', onUnhandled)
      }
    })
  }

  it('two clients on two platforms keep their own tokens', async () => {
    const uni = makeUni()
    const taro = makeTaro()
    const a = createClient({ appid: DEMO_APPID, baseURL, platform: uni.api })
    const b = createClient({ appid: DEMO_APPID, baseURL, platform: taro.api })
    const [ta, tb] = await Promise.all([a.login(), b.login()])
    assert.notEqual(ta.token, tb.token)
    assert.equal(a.token(), ta.token)
    assert.equal(b.token(), tb.token)
  })

  it('a platform without the functions the client calls is refused at createClient', () => {
    const uni = makeUni()
    const partial = Object.assign({}, uni.api)
    delete partial.login
    delete partial.removeStorageSync
    assert.throws(() => createClient({ appid: DEMO_APPID, baseURL, platform: partial }),
      (err) => err instanceof TypeError && /lacks login, removeStorageSync/.test(err.message))
    assert.throws(() => createClient({ appid: DEMO_APPID, baseURL, platform: null }), TypeError)
    assert.throws(() => createClient({ appid: DEMO_APPID, baseURL, platform: 'uni' }), TypeError)
  })

  it('without platform and without a global wx, calls reject with no_wx', async () => {
    const client = createClient({ appid: DEMO_APPID, baseURL })
    await assert.rejects(client.login(), { error: 'no_wx' })
    await assert.rejects(client.request({ url: '/api/x' }), { error: 'no_wx' })
  })
  for (const [name, make, loginCall] of [['qq', makeQq, 'qq.login'], ['tt', makeTt, 'tt.login'],
    ['my', makeMy, 'my.getAuthCode']]) {
    it(`the global ${name}: ${loginCall} logs in, requests carry the token, logout ends the session`, async () => {
      const platform = make()
      const client = createClient({ appid: DEMO_APPID, baseURL })
      const body = await client.login()
      assert.equal(platform.logins, 1)
      const sentLogin = JSON.parse(requestsTo(platform, '/auth/login')[0].body)
      assert.equal(sentLogin.code, platform.codes[0])
      assert.equal(platform.storage.get(DEFAULT_STORAGE_KEY), body.token)
      assert.equal(client.token(), body.token)
      const res = await client.request({ url: '/api/echo', header: { 'X-MP-Platform': 'forged' } })
      assert.equal(res.statusCode, 200)
      assert.equal(res.data.headers['X-WX-OpenID'], body.openid)
      assert.equal(res.data.headers['X-MP-Platform'], 'wechat') // the demo's app is WeChat's
      const [sent] = requestsTo(platform, '/api/echo')
      assert.equal(sent.header.Authorization, `Bearer ${body.token}`)
      await client.logout()
      assert.equal(platform.storage.has(DEFAULT_STORAGE_KEY), false)
      assert.equal((await rawCall('GET', '/auth/session', body.token)).statusCode, 401)
    })
  }

  it('tt: anonymousCode goes along as anonymous_code; without a code nothing is sent', async () => {
    let tt = makeTt()
    let client = createClient({ appid: DEMO_APPID, baseURL })
    await client.login()
    assert.deepEqual(JSON.parse(requestsTo(tt, '/auth/login')[0].body),
      { code: tt.codes[0], anonymous_code: tt.anonymousCodes[0], appid: DEMO_APPID })

    tt = makeTt({ loggedIn: false }) // not logged in to the Douyin app: only anonymousCode
    client = createClient({ appid: DEMO_APPID, baseURL })
    await assert.rejects(client.login(), { statusCode: 0, error: 'wx_login_failed', message: 'login gave no code' })
    assert.equal(tt.requests.length, 0)
  })

  it('my: getAuthCode with auth_base, `headers` not `header`, answers in wx.request\'s shape', async () => {
    const my = makeMy()
    const client = createClient({ baseURL, appid: 'wxdemo0000000001' })
    const body = await client.login()
    assert.deepEqual(my.scopes, ['auth_base'])
    assert.deepEqual(JSON.parse(requestsTo(my, '/auth/login')[0].body),
      { code: my.codes[0], appid: 'wxdemo0000000001' })
    // my's own spelling of the option is taken too, and Authorization is still ours alone
    const res = await client.request({ url: '/api/my', headers: { 'X-Custom': 'v', authorization: 'Bearer nope' } })
    assert.deepEqual(my.headerKeys.at(-1), ['headers'])
    assert.equal(res.statusCode, 200)
    assert.equal(res.status, 200)
    assert.equal(res.data.headers['X-Custom'], 'v')
    assert.equal(res.data.headers['X-WX-OpenID'], body.openid)
    assert.equal(requestsTo(my, '/api/my')[0].header.Authorization, `Bearer ${body.token}`)
    assert.equal(typeof res.header, 'object')
  })

  it('my: an HTTP error status in my.request\'s failure is an answer: 401 re-logs in, errors keep their code', async () => {
    let my = makeMy()
    let client = createClient({ appid: DEMO_APPID, baseURL })
    my.storage.set(DEFAULT_STORAGE_KEY, 'garbage-token')
    const res = await client.request({ url: '/api/after401' })
    assert.equal(res.statusCode, 200)
    assert.equal(my.logins, 1)
    assert.equal(requestsTo(my, '/api/after401').length, 2)
    const notFound = await client.request({ url: '/nowhere' })
    assert.equal(notFound.statusCode, 404)
    assert.equal(notFound.data.error, 'not_found')

    my = makeMy({ codeFor: () => 'errcode-40029-x' })
    client = createClient({ appid: DEMO_APPID, baseURL })
    await assert.rejects(client.login(), { statusCode: 401, error: 'invalid_code' })

    my = makeMy({ codeFor: () => null }) // getAuthCode fails: {error, errorMessage}
    client = createClient({ appid: DEMO_APPID, baseURL })
    await assert.rejects(client.login(), { statusCode: 0, error: 'wx_login_failed', message: '用户取消操作' })

    my = makeMy()
    client = createClient({ appid: DEMO_APPID, baseURL: `http://127.0.0.1:${await freePort()}` })
    my.storage.set(DEFAULT_STORAGE_KEY, 'some-token')
    await assert.rejects(client.request({ url: '/api/x' }), { statusCode: 0, error: 'network_error' })
  })

  it('my passed as platform (not global) is recognised by its getAuthCode', async () => {
    const my = makeMy({ global: false })
    assert.equal(typeof globalThis.my, 'undefined')
    const client = createClient({ appid: DEMO_APPID, baseURL, platform: my.api })
    const body = await client.login()
    assert.deepEqual(my.scopes, ['auth_base'])
    assert.equal(my.storage.get(DEFAULT_STORAGE_KEY), body.token)
  })

  it('wecom: true logs in with wx.qy.login, never wx.login; outside the WeCom client it fails clearly', async () => {
    const wecom = makeWecom()
    let client = createClient({ appid: DEMO_APPID, baseURL, wecom: true })
    await client.login()
    assert.equal(wecom.qyLogins, 1)
    assert.equal(wecom.wxLogins, undefined)
    assert.deepEqual(JSON.parse(requestsTo(wecom, '/auth/login')[0].body),
      { code: wecom.codes[0], appid: DEMO_APPID })
    // the default stays wx.login, even inside the WeCom client
    client = createClient({ appid: DEMO_APPID, baseURL })
    await client.login()
    assert.equal(wecom.wxLogins, 1)
    assert.equal(wecom.qyLogins, 1)

    const wx = makeWx() // plain WeChat: no wx.qy
    client = createClient({ appid: DEMO_APPID, baseURL, wecom: true })
    await assert.rejects(client.login(), (err) => {
      assert.equal(err.error, 'wx_login_failed')
      assert.match(err.message, /wx\.qy\.login.*WeCom client/)
      return true
    })
    assert.equal(wx.logins, 0)
    assert.equal(wx.requests.length, 0)
    assert.throws(() => createClient({ appid: DEMO_APPID, baseURL, wecom: 'yes' }), TypeError)
  })

  it('uni and Taro giving Alipay\'s authCode instead of code still log in', async () => {
    const uni = makeUni()
    const login = uni.api.login
    uni.api.login = (opts) => login(Object.assign({}, opts, {
      success: (res) => opts.success({ authCode: res.code, errMsg: 'login:ok' }),
    }))
    const body = await createClient({ appid: DEMO_APPID, baseURL, platform: uni.api }).login()
    assert.equal(JSON.parse(requestsTo(uni, '/auth/login')[0].body).code, uni.codes[0])
    assert.equal(uni.storage.get(DEFAULT_STORAGE_KEY), body.token)
  })
})
