import Foundation

/// A parsed `postgres://user:password@host:port/database?sslmode=…` URL.
public struct DatabaseURL: Sendable, Hashable {
  /// How to use TLS to the database: `disable`, `prefer` (default) or `require`.
  public enum TLSMode: String, Sendable, Hashable {
    case disable, prefer, require
  }

  public var host: String
  public var port: Int
  public var username: String
  public var password: String?
  public var database: String
  public var tlsMode: TLSMode

  public struct Invalid: Error, CustomStringConvertible, Sendable {
    public let description: String
  }

  public init(host: String, port: Int, username: String, password: String?, database: String, tlsMode: TLSMode) {
    self.host = host
    self.port = port
    self.username = username
    self.password = password
    self.database = database
    self.tlsMode = tlsMode
  }

  public init(parsing text: String) throws(Invalid) {
    guard let url = URLComponents(string: text), let scheme = url.scheme, ["postgres", "postgresql"].contains(scheme)
    else {
      throw Invalid(description: "must look like postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE")
    }
    guard let host = url.host, !host.isEmpty else { throw Invalid(description: "has no host") }
    guard let user = url.user, !user.isEmpty else { throw Invalid(description: "has no user name") }
    let database = String(url.path.drop(while: { $0 == "/" }))
    guard !database.isEmpty else { throw Invalid(description: "has no database name after the host") }
    var mode = TLSMode.prefer
    for item in url.queryItems ?? [] {
      switch item.name {
      case "sslmode":
        guard let value = item.value, let parsed = TLSMode(rawValue: value) else {
          throw Invalid(description: "sslmode must be disable, prefer or require")
        }
        mode = parsed
      default:
        throw Invalid(description: "unknown parameter '\(item.name)'; only sslmode is supported")
      }
    }
    self.init(
      host: host,
      port: url.port ?? 5432,
      username: user.removingPercentEncoding ?? user,
      password: url.password.map { $0.removingPercentEncoding ?? $0 },
      database: database,
      tlsMode: mode
    )
  }

  /// The URL without its password, for logs and messages.
  public var redacted: String {
    "postgres://\(username)@\(host):\(port)/\(database)?sslmode=\(tlsMode.rawValue)"
  }
}
