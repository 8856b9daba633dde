/// A parsed Tollgate SPIFFE ID: `spiffe://<trust-domain>/tenant/<tenant>/<role>/<name>` for a
/// tenant principal or `spiffe://<trust-domain>/operator/<name>` for an operator.
public struct SPIFFEID: Hashable, Sendable, CustomStringConvertible {
  public let trustDomain: String
  /// nil for operators.
  public let tenant: TenantID?
  public let role: Role
  public let name: String

  /// Why a URI is not a usable Tollgate SPIFFE ID.
  public struct Invalid: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
  }

  public init(tenant: TenantID, role: Role, name: String, trustDomain: String) {
    self.trustDomain = trustDomain
    self.tenant = tenant
    self.role = role
    self.name = name
  }

  public init(operatorNamed name: String, trustDomain: String) {
    self.trustDomain = trustDomain
    self.tenant = nil
    self.role = .operator
    self.name = name
  }

  /// Parses `uri`; it must be well-formed and (when `expectedTrustDomain` is given) of that domain.
  public init(parsing uri: String, expectedTrustDomain: String?) throws(Invalid) {
    let prefix = "spiffe://"
    guard uri.hasPrefix(prefix) else { throw Invalid("URI SAN '\(uri)' is not a spiffe:// URI") }
    let rest = uri.dropFirst(prefix.count)
    if rest.contains("?") || rest.contains("#") || rest.contains("%") {
      throw Invalid("SPIFFE ID '\(uri)' must not contain a query, fragment or percent-encoding")
    }
    let parts = rest.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
    guard let domain = parts.first, SPIFFEID.isValidTrustDomain(domain) else {
      throw Invalid("SPIFFE ID '\(uri)' has no valid trust domain")
    }
    if let expected = expectedTrustDomain, domain != expected {
      throw Invalid("SPIFFE ID '\(uri)' is of trust domain '\(domain)', not '\(expected)'")
    }
    let path = Array(parts.dropFirst())
    if path.contains(where: { $0.isEmpty || $0 == "." || $0 == ".." }) {
      throw Invalid("SPIFFE ID '\(uri)' has an empty or dot path segment")
    }
    switch path.first {
    case "operator":
      guard path.count == 2, SPIFFEID.isValidName(path[1]) else {
        throw Invalid("operator SPIFFE ID must be spiffe://\(domain)/operator/<name>, got '\(uri)'")
      }
      self.init(operatorNamed: path[1], trustDomain: domain)
    case "tenant":
      guard path.count == 4 else {
        throw Invalid("tenant SPIFFE ID must be spiffe://\(domain)/tenant/<tenant>/<role>/<name>, got '\(uri)'")
      }
      let tenant: TenantID
      do {
        tenant = try TenantID(validating: path[1])
      } catch {
        throw Invalid("SPIFFE ID '\(uri)': \(error)")
      }
      guard let role = Role(rawValue: path[2]), role != .operator else {
        throw Invalid(
          "SPIFFE ID '\(uri)' names role '\(path[2])'; tenant roles are \(Role.tenantRoles.map(\.rawValue).joined(separator: ", "))"
        )
      }
      guard SPIFFEID.isValidName(path[3]) else {
        throw Invalid("SPIFFE ID '\(uri)' has an invalid principal name '\(path[3])'")
      }
      self.init(tenant: tenant, role: role, name: path[3], trustDomain: domain)
    default:
      throw Invalid("SPIFFE ID '\(uri)' must have a path starting /tenant/ or /operator/")
    }
  }

  public var description: String {
    if let tenant {
      return "spiffe://\(trustDomain)/tenant/\(tenant)/\(role.rawValue)/\(name)"
    }
    return "spiffe://\(trustDomain)/operator/\(name)"
  }

  /// SPIFFE trust domains: lowercase letters, digits, '.', '-' and '_', 1 to 255 characters.
  public static func isValidTrustDomain(_ text: String) -> Bool {
    !text.isEmpty && text.count <= 255
      && text.allSatisfy { $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "." || $0 == "-" || $0 == "_") }
  }

  /// Principal names: ASCII letters, digits, '.', '-' and '_', 1 to 128 characters.
  public static func isValidName(_ text: String) -> Bool {
    !text.isEmpty && text.count <= 128
      && text.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == "_") }
  }
}
