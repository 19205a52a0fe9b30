// Type declarations for wx-gateway.js, the wx-gateway client for mini-programs (WeChat, WeCom,
// QQ, Douyin, Alipay).
// Standalone: no dependency on miniprogram-api-typings (its types are compatible).

/** Options of {@link createClient}. */
export interface ClientOptions {
  /** The gateway, e.g. `'https://gw.example.com'`; a trailing slash is ignored. */
  baseURL: string
  /** Sent with the login; needed when the gateway serves several mini-programs. */
  appid?: string
  /** The storage key that holds the token. Default `'wxgw_token'`. */
  storageKey?: string
  /**
   * The API object to call: `wx`, `qq`, `tt`, `my`, uni-app's `uni` or `Taro`. Default: the
   * global one (`wx`, `qq`, `tt` or `my`, looked for in this order). Taro's promise-returning
   * calls are fine: the client uses the callbacks and consumes the promise.
   */
  platform?: Platform | AlipayPlatform
  /**
   * `true`: log in with `wx.qy.login`, for an app the gateway serves as `platform: wecom`
   * (it exists only inside the WeCom client; elsewhere the login fails with
   * `wx_login_failed`). Default `false`: `wx.login`, also inside the WeCom client.
   */
  wecom?: boolean
}

/**
 * What the client calls on `wx`, `uni` or `Taro` (all three have these, with the same options
 * and callback results). Return values are ignored, except that a returned promise's rejection
 * is consumed.
 */
export interface Platform {
  request(options: Record<string, any>): unknown
  login(options: Record<string, any>): unknown
  getStorageSync(key: string): any
  setStorageSync(key: string, value: any): unknown
  removeStorageSync(key: string): unknown
  /** WeCom's login, inside the WeCom client (used with `wecom: true`). */
  qy?: { login(options: Record<string, any>): unknown }
}

/**
 * Alipay's `my`: `getAuthCode` instead of `login`, `my.request` with `headers` answering
 * `{data, status, headers}`, storage functions taking `{key, data}`. The client adapts to all
 * of it and resolves `request()` in `wx.request`'s shape.
 */
export interface AlipayPlatform {
  request(options: Record<string, any>): unknown
  getAuthCode(options: Record<string, any>): unknown
  getStorageSync(options: { key: string }): any
  setStorageSync(options: { key: string, data: any }): unknown
  removeStorageSync(options: { key: string }): unknown
}

/** The body of `POST /auth/login` (and `/auth/refresh`). */
export interface LoginResult {
  token: string
  token_type: 'Bearer'
  /** Seconds until the token expires. */
  expires_in: number
  openid: string
  /** `null` when WeChat gives none (the app is not bound to an Open Platform account). */
  unionid: string | null
}

/** The body of `POST /auth/phone`. */
export interface PhoneNumber {
  /** With the country code for numbers outside mainland China, e.g. `'+1 202...'`. */
  phone_number: string
  /** Without the country code. */
  pure_phone_number: string
  country_code: string
}

/** The event of `<button open-type="getPhoneNumber" bindgetphonenumber="...">`. */
export interface PhoneNumberEvent {
  detail: {
    /** The one-time code to exchange for the number; absent when the user denied. */
    code?: string
    /** e.g. `'getPhoneNumber:ok'` or `'getPhoneNumber:fail user deny'`. */
    errMsg?: string
    encryptedData?: string
    iv?: string
    [key: string]: unknown
  }
  [key: string]: unknown
}

export type HttpMethod =
  | 'GET' | 'POST' | 'PUT' | 'DELETE' | 'PATCH' | 'HEAD' | 'OPTIONS' | 'TRACE' | 'CONNECT'

/**
 * The options of `wx.request`, with `url` a path on the gateway (`'/api/orders'`) or an
 * absolute URL under `baseURL` (any other host is refused: the token is only sent to the
 * gateway). `Authorization` is set by the client. Callbacks are not supported: use the promise.
 */
export interface RequestOptions {
  url: string
  method?: HttpMethod
  data?: string | Record<string, any> | ArrayBuffer
  header?: Record<string, string>
  /** Alipay's spelling of `header`: either is taken on every platform. */
  headers?: Record<string, string>
  /** `'json'` (default) parses the body as JSON when it is JSON. */
  dataType?: 'json' | string
  responseType?: 'text' | 'arraybuffer'
  /** Milliseconds. */
  timeout?: number
  enableHttp2?: boolean
  enableQuic?: boolean
  enableCache?: boolean
  enableChunked?: boolean
  forceCellularNetwork?: boolean
  [key: string]: unknown
  success?: never
  fail?: never
  complete?: never
}

/**
 * What `wx.request` passes to `success`, whatever the status code. On Alipay, `my.request`'s
 * answer with `statusCode` and `header` added (its `status` and `headers` kept).
 */
export interface RequestResult<T = any> {
  data: T
  statusCode: number
  header: Record<string, string>
  cookies?: string[]
  errMsg: string
  [key: string]: unknown
}

/** Error codes this client produces itself (`statusCode` 0: no HTTP answer, or see below). */
export type ClientErrorCode =
  /** `wx.request` failed (no connection, timeout, domain not allowed...). */
  | 'network_error'
  /** The platform's login (`wx.login`, `wx.qy.login`, `qq.login`, `tt.login`, `my.getAuthCode`) failed or gave no code. */
  | 'wx_login_failed'
  /** The getPhoneNumber event had no code: the user denied (the gateway was not called). */
  | 'user_denied'
  /** A 2xx answer without the expected body (`statusCode` is that status). */
  | 'invalid_response'
  /** An error status without a gateway `{error, message}` body (`statusCode` is that status). */
  | 'http_error'
  /** `request()` without a url, or with one outside `baseURL`. */
  | 'invalid_url'
  /** No `platform` was given and there is no global `wx`, `qq`, `tt` or `my`. */
  | 'no_wx'

/**
 * Every rejection of the client. For gateway errors, `statusCode` is the HTTP status and
 * `error`/`message` the gateway's (`invalid_code`, `unauthorized`, `rate_limited`,
 * `invalid_phone_code`, ... as listed in the gateway's docs/endpoints.md).
 */
export declare class WxGatewayError extends Error {
  constructor(statusCode: number, error: string, message: string, extra?: Record<string, unknown>)
  name: 'WxGatewayError'
  /** The HTTP status, 0 when there was no HTTP answer. */
  statusCode: number
  /** The gateway's error code, or one of {@link ClientErrorCode}. */
  error: ClientErrorCode | string
  message: string
  /** The `errMsg` of the failed `wx` call, when there was one. */
  errMsg?: string
  /** The `wx.request` result, when the error came from an HTTP answer. */
  response?: RequestResult
}

export interface WxGatewayClient {
  /** `baseURL` without its trailing slash. */
  readonly baseURL: string
  /**
   * The platform's login (`wx.login()`, `wx.qy.login()`, `qq.login()`, `tt.login()`,
   * `my.getAuthCode({scopes: 'auth_base'})`), then `POST /auth/login` `{code, appid?}` (and
   * Douyin's `anonymous_code`); stores the token in the platform's storage. Concurrent calls
   * share one login.
   */
  login(): Promise<LoginResult>
  /**
   * `wx.request` with `Authorization: Bearer <token>`, logging in first when no token is
   * stored. Resolves with the `wx.request` result whatever its status; on a 401 it logs in
   * again once (one login for any number of concurrent 401s) and retries once; a second 401
   * is returned, not retried. Rejects when the network or the login fails.
   */
  request<T = any>(options: RequestOptions): Promise<RequestResult<T>>
  /**
   * `POST /auth/logout`; the stored token is removed whatever happens. Resolves when the
   * session ended (or was already gone, or no token was stored), rejects otherwise.
   */
  logout(): Promise<void>
  /**
   * Exchanges the getPhoneNumber button's `detail.code` through `POST /auth/phone`. Rejects
   * with `error: 'user_denied'` without calling the gateway when the event has no code.
   */
  getPhoneNumber(event: PhoneNumberEvent | PhoneNumberEvent['detail']): Promise<PhoneNumber>
  /** The stored token, or `null`. */
  token(): string | null
}

export declare function createClient(options: ClientOptions): WxGatewayClient

/** `'wxgw_token'` */
export declare const DEFAULT_STORAGE_KEY: string
