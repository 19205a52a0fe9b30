/**
 * wx-gateway client for mini-programs: WeChat, WeCom, QQ, Douyin (ByteDance), Alipay.
 *
 * Logs in through the gateway (wx.login / wx.qy.login / qq.login / tt.login /
 * my.getAuthCode -> POST /auth/login), keeps the session token in the platform's storage, adds
 * `Authorization: Bearer <token>` to requests and, when the gateway answers 401, logs in again
 * once (one login for any number of concurrent 401s) and retries.
 *
 * No dependencies. CommonJS. Promises only (no async/await), so it runs with or without the
 * developer tools' "ES6 to ES5" / enhanced compilation and needs no regenerator runtime.
 *
 *   const { createClient } = require('./utils/wx-gateway.js')
 *   const gateway = createClient({ baseURL: 'https://gw.example.com' })
 *
 * The platform's API object is found by itself (the global wx, qq, tt or my); uni-app and
 * Taro: pass their API object, which has wx's shapes on every platform (request, login and the
 * storage functions with success/fail callbacks):
 *
 *   createClient({ baseURL: 'https://gw.example.com', platform: uni })
 *   createClient({ baseURL: 'https://gw.example.com', platform: Taro })
 */
'use strict'

var DEFAULT_STORAGE_KEY = 'wxgw_token'

/**
 * The error every rejection carries: `statusCode` (the HTTP status, 0 when there was no HTTP
 * answer), `error` (the gateway's error code, or one of this client's: network_error,
 * wx_login_failed, user_denied, invalid_response, http_error, invalid_url) and `message`.
 */
function WxGatewayError(statusCode, error, message, extra) {
  if (!(this instanceof WxGatewayError)) return new WxGatewayError(statusCode, error, message, extra)
  this.name = 'WxGatewayError'
  this.message = message
  this.statusCode = statusCode
  this.error = error
  if (extra) {
    for (var key in extra) {
      if (Object.prototype.hasOwnProperty.call(extra, key) && extra[key] !== undefined) {
        this[key] = extra[key]
      }
    }
  }
  if (typeof Error.captureStackTrace === 'function') {
    Error.captureStackTrace(this, WxGatewayError)
  } else {
    this.stack = new Error(message).stack
  }
}
WxGatewayError.prototype = Object.create(Error.prototype, {
  constructor: { value: WxGatewayError, writable: true, configurable: true },
})

/** The error for a wx.request result that is not the expected success. */
function errorFromResponse(res) {
  var data = res.data
  if (typeof data === 'string') {
    try { data = JSON.parse(data) } catch (e) { /* not JSON: keep the string */ }
  }
  if (data && typeof data === 'object' && typeof data.error === 'string') {
    return new WxGatewayError(res.statusCode, data.error,
      typeof data.message === 'string' ? data.message : data.error, { response: res })
  }
  if (res.statusCode >= 200 && res.statusCode < 300) {
    return new WxGatewayError(res.statusCode, 'invalid_response',
      'the gateway answered ' + res.statusCode + ' without the expected body', { response: res })
  }
  return new WxGatewayError(res.statusCode, 'http_error',
    'HTTP ' + res.statusCode + ' without a gateway error body', { response: res })
}

var PLATFORM_FUNCTIONS = ['request', 'login', 'getStorageSync', 'setStorageSync', 'removeStorageSync']

/** The mini-program runtime's own API object: WeChat and WeCom `wx`, QQ `qq`, Douyin `tt`, Alipay `my`. */
function getGlobalApi() {
  /* global wx, qq, tt, my */
  if (typeof wx !== 'undefined' && wx) return wx
  if (typeof qq !== 'undefined' && qq) return qq
  if (typeof tt !== 'undefined' && tt) return tt
  if (typeof my !== 'undefined' && my) return my
  throw new WxGatewayError(0, 'no_wx',
    'no mini-program API object (wx, qq, tt or my) is available (pass `platform`: uni, Taro, wx...)')
}

/**
 * Alipay's `my` has other shapes than wx's: no login() but getAuthCode() giving `authCode`;
 * my.request takes `headers` and answers `{status, headers, data}`; the storage functions take
 * `{key, data}` objects (Alipay mini-program API docs: my.request, my.getStorageSync).
 * uni-app and Taro give wx's shapes on Alipay too, and have login(): they are not this.
 */
function isAlipay(api) {
  return typeof api.login !== 'function' && typeof api.getAuthCode === 'function'
}

/** my.request's answer in wx.request's shape; the original fields are kept. */
function fromAlipay(res) {
  return Object.assign({}, res, { statusCode: res.status, header: res.headers || {} })
}

function noop() {}

/**
 * Calls `fn(call)` of the platform. Taro's API answers with a promise as well as the callbacks,
 * and that promise rejects when the call fails: the callbacks already handle the outcome, so
 * the promise's rejection is consumed here instead of surfacing as an unhandled rejection.
 * (wx and uni, given callbacks, return a RequestTask, not a promise.)
 */
function invoke(api, name, call) {
  var returned = api[name](call)
  if (returned && typeof returned.then === 'function') returned.then(noop, noop)
  return returned
}

function hasOwn(obj, key) {
  return Object.prototype.hasOwnProperty.call(obj, key)
}

/**
 * createClient({ baseURL, appid?, storageKey?, platform?, wecom? })
 *   baseURL     the gateway, e.g. 'https://gw.example.com' (no trailing slash needed)
 *   appid       sent with the login when the gateway serves several mini-programs
 *   storageKey  storage key of the token ['wxgw_token']
 *   platform    the API object: wx, qq, tt, my, uni (uni-app) or Taro [the global one]
 *   wecom       true: log in with wx.qy.login, for an app the gateway serves as WeCom's [false]
 */
function createClient(options) {
  if (!options || typeof options.baseURL !== 'string' || !/^https?:\/\/[^/]+/i.test(options.baseURL)) {
    throw new TypeError('createClient: baseURL must be an http(s) URL, e.g. https://gw.example.com')
  }
  var platform = options.platform
  if (platform !== undefined) {
    var lacking = PLATFORM_FUNCTIONS.filter(function (name) {
      if (platform && name === 'login' && typeof platform.getAuthCode === 'function') return false
      return !platform || typeof platform[name] !== 'function'
    })
    if (lacking.length) {
      throw new TypeError('createClient: platform must be wx, qq, tt, my, uni or Taro (an object with ' +
        PLATFORM_FUNCTIONS.join(', ') + ', or my\'s getAuthCode); it lacks ' + lacking.join(', '))
    }
  }
  if (options.wecom !== undefined && typeof options.wecom !== 'boolean') {
    throw new TypeError('createClient: wecom must be true or false')
  }
  var wecom = options.wecom === true
  function api() { return platform || getGlobalApi() }

  function storageGet(key) {
    var a = api()
    if (!isAlipay(a)) return a.getStorageSync(key)
    var res = a.getStorageSync({ key: key })
    return res ? res.data : undefined
  }
  function storageSet(key, value) {
    var a = api()
    if (isAlipay(a)) a.setStorageSync({ key: key, data: value })
    else a.setStorageSync(key, value)
  }
  function storageRemove(key) {
    var a = api()
    if (isAlipay(a)) a.removeStorageSync({ key: key })
    else a.removeStorageSync(key)
  }
  var baseURL = options.baseURL.replace(/\/+$/, '')
  var appid = options.appid
  var storageKey = options.storageKey || DEFAULT_STORAGE_KEY
  var loginInFlight = null // the login running now
  var lastLogin = null // the latest login, running or settled
  var logins = 0 // logins started

  function token() {
    var value = storageGet(storageKey)
    return typeof value === 'string' && value ? value : null
  }

  /** '/api/x', 'api/x' or an absolute URL under baseURL; never another host (the token stays ours). */
  function resolveURL(url) {
    if (typeof url !== 'string' || !url) {
      throw new WxGatewayError(0, 'invalid_url', 'request: `url` is required')
    }
    if (/^[a-z][a-z0-9+.-]*:/i.test(url) || url.indexOf('//') === 0) {
      if (url === baseURL || url.indexOf(baseURL + '/') === 0 || url.indexOf(baseURL + '?') === 0) {
        return url
      }
      throw new WxGatewayError(0, 'invalid_url',
        'request: ' + url + ' is not under ' + baseURL + ' (the token is only sent to the gateway)')
    }
    return baseURL + (url.charAt(0) === '/' ? url : '/' + url)
  }

  /**
   * One request; resolves with its result in wx.request's shape ({data, statusCode, header})
   * whatever the status, rejects on failure.
   */
  function send(options, bearer) {
    return new Promise(function (resolve, reject) {
      var a = api()
      var alipay = isAlipay(a)
      var header = {}
      // `header` is wx's (and qq's, tt's, uni's, Taro's) name, `headers` my's: either is taken.
      var givens = [options.header || {}, options.headers || {}]
      givens.forEach(function (given) {
        for (var name in given) {
          if (hasOwn(given, name) && name.toLowerCase() !== 'authorization') header[name] = given[name]
        }
      })
      if (bearer) header.Authorization = 'Bearer ' + bearer
      var call = {}
      for (var key in options) {
        if (hasOwn(options, key) && key !== 'success' && key !== 'fail' && key !== 'complete' &&
            key !== 'header' && key !== 'headers') {
          call[key] = options[key]
        }
      }
      call[alipay ? 'headers' : 'header'] = header
      call.success = function (res) { resolve(alipay ? fromAlipay(res) : res) }
      call.fail = function (err) {
        // my.request may fail on an HTTP error status and yet hand over the answer (status,
        // headers, data): the gateway's {error, message} is in it, so it is a result.
        if (alipay && err && typeof err.status === 'number' && err.status > 0) {
          resolve(fromAlipay(err))
          return
        }
        var errMsg = (err && (err.errMsg || err.errorMessage)) || 'request:fail'
        reject(new WxGatewayError(0, 'network_error', errMsg, { errMsg: errMsg }))
      }
      invoke(a, 'request', call)
    })
  }

  /**
   * The platform's login: resolves with the fields of POST /auth/login that come from it,
   * {code} and, from Douyin's tt.login, {anonymous_code} as well.
   */
  function platformLogin() {
    return new Promise(function (resolve, reject) {
      var a = api()
      var name = 'login'
      var target = a
      var call = {}
      if (wecom) {
        // WeCom's own code exists only inside the WeCom client; there wx.login gives a WeChat
        // code, which a WeCom app would refuse (WeCom developer docs, mini-programs: wx.qy.login).
        if (!a.qy || typeof a.qy.login !== 'function') {
          reject(new WxGatewayError(0, 'wx_login_failed',
            'wx.qy.login is not available: the mini-program is not running in the WeCom client'))
          return
        }
        target = a.qy
        name = 'wx.qy.login'
      } else if (isAlipay(a)) {
        // auth_base: silent authorisation, no consent sheet, enough for the user id (Alipay
        // mini-program docs: my.getAuthCode, scopes)
        call.scopes = 'auth_base'
        name = 'my.getAuthCode'
      }
      function fail(err) {
        var errMsg = (err && (err.errMsg || err.errorMessage)) || name + ':fail'
        reject(new WxGatewayError(0, 'wx_login_failed', errMsg, { errMsg: errMsg }))
      }
      call.success = function (res) {
        // my.getAuthCode gives authCode; uni.login and Taro.login on Alipay give it as code.
        var code = res && (typeof res.code === 'string' && res.code ? res.code : res.authCode)
        if (typeof code !== 'string' || !code) {
          // tt.login of a user not logged in to the Douyin app: only anonymousCode
          reject(new WxGatewayError(0, 'wx_login_failed', name + ' gave no code',
            { errMsg: res && (res.errMsg || res.errorMessage) }))
          return
        }
        var fields = { code: code }
        if (typeof res.anonymousCode === 'string' && res.anonymousCode) {
          fields.anonymous_code = res.anonymousCode
        }
        resolve(fields)
      }
      call.fail = fail
      try {
        if (target === a && isAlipay(a)) invoke(a, 'getAuthCode', call)
        else invoke(target, 'login', call)
      } catch (err) {
        fail({ errMsg: name + ':fail ' + (err && err.message) })
      }
    })
  }

  /**
   * The platform's login -> POST /auth/login -> token stored. Concurrent calls share one login.
   * Resolves with the gateway's body {token, token_type, expires_in, openid, unionid}.
   */
  function login() {
    if (loginInFlight) return loginInFlight
    logins += 1
    var flight = platformLogin().then(function (data) {
      if (appid) data.appid = appid
      return send({ url: baseURL + '/auth/login', method: 'POST', data: data,
        header: { 'Content-Type': 'application/json' } }, null)
    }).then(function (res) {
      if (res.statusCode !== 200 || !res.data || typeof res.data !== 'object' ||
          typeof res.data.token !== 'string' || !res.data.token) {
        throw errorFromResponse(res)
      }
      storageSet(storageKey, res.data.token)
      return res.data
    })
    loginInFlight = lastLogin = flight
    function done() { if (loginInFlight === flight) loginInFlight = null }
    flight.then(done, done)
    return flight
  }

  /**
   * wx.request through the gateway with the token. Resolves with wx.request's success result
   * ({data, statusCode, header, ...}) whatever the status; on a 401 logs in again once and
   * retries once (a second 401 is returned as is); rejects when the network fails or the
   * login does. `success`/`fail`/`complete` callbacks are not used: use the promise.
   *
   * Single flight: a 401 for a request sent before (or while) a login ran reuses that login's
   * outcome instead of starting another, so any number of concurrent 401s cause one login.
   */
  function request(options) {
    var prepared, stored
    try {
      if (!options || typeof options !== 'object') {
        throw new WxGatewayError(0, 'invalid_url', 'request: options with a `url` are required')
      }
      prepared = Object.assign({}, options, { url: resolveURL(options.url) })
      stored = token()
    } catch (err) {
      return Promise.reject(err)
    }
    var loggedIn = !stored
    var epoch = 0
    var first = stored ? Promise.resolve(stored) : login().then(function (body) { return body.token })
    return first.then(function (bearer) {
      // Logins started after this point, or running now, are newer than `bearer`.
      epoch = loginInFlight ? logins - 1 : logins
      return send(prepared, bearer)
    }).then(function (res) {
      if (res.statusCode !== 401 || loggedIn) return res
      var renewal = logins !== epoch ? lastLogin : login()
      return renewal.then(function (body) { return send(prepared, body.token) })
    })
  }

  /**
   * POST /auth/logout, then the stored token is removed whatever happened. Resolves when the
   * gateway ended the session (204) or it was already gone (401, or no token stored); rejects
   * otherwise, e.g. when the network failed (the token is removed all the same).
   */
  function logout() {
    var current
    try {
      current = token()
    } catch (err) {
      return Promise.reject(err)
    }
    if (!current) return Promise.resolve()
    var call = send({ url: baseURL + '/auth/logout', method: 'POST' }, current)
    function clear() {
      try {
        if (storageGet(storageKey) === current) storageRemove(storageKey)
      } catch (e) { /* nothing more to do */ }
    }
    return call.then(function (res) {
      clear()
      if (res.statusCode === 204 || res.statusCode === 200 || res.statusCode === 401) return undefined
      throw errorFromResponse(res)
    }, function (err) {
      clear()
      throw err
    })
  }

  /**
   * For <button open-type="getPhoneNumber" bindgetphonenumber="...">: sends the event's
   * detail.code to POST /auth/phone. Resolves with {phone_number, pure_phone_number,
   * country_code}; rejects with error 'user_denied' (without calling the gateway) when the
   * event has no code, e.g. the user refused.
   */
  function getPhoneNumber(event) {
    var detail = event && typeof event === 'object' && event.detail ? event.detail : event
    var code = detail && typeof detail === 'object' ? detail.code : undefined
    if (typeof code !== 'string' || !code) {
      var errMsg = detail && typeof detail === 'object' && typeof detail.errMsg === 'string'
        ? detail.errMsg : undefined
      return Promise.reject(new WxGatewayError(0, 'user_denied',
        'no phone number code: the user denied it or the button gave none' +
        (errMsg ? ' (' + errMsg + ')' : ''), { errMsg: errMsg }))
    }
    return request({ url: '/auth/phone', method: 'POST', data: { code: code },
      header: { 'Content-Type': 'application/json' } }).then(function (res) {
      if (res.statusCode !== 200 || !res.data || typeof res.data !== 'object' ||
          typeof res.data.phone_number !== 'string') {
        throw errorFromResponse(res)
      }
      return res.data
    })
  }

  return {
    baseURL: baseURL,
    login: login,
    request: request,
    logout: logout,
    getPhoneNumber: getPhoneNumber,
    token: token,
  }
}

module.exports = {
  createClient: createClient,
  WxGatewayError: WxGatewayError,
  DEFAULT_STORAGE_KEY: DEFAULT_STORAGE_KEY,
}
