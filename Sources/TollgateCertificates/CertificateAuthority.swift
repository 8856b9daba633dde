import Crypto
import Glibc
public import Foundation
import SwiftASN1
public import TollgateModel
public import X509

/// A certificate authority that issues Tollgate's client and server certificates: ECDSA P-256
/// keys, SPIFFE ID URI SANs for principals, DNS/IP SANs for the gateway.
///
/// Bring-your-own-CA deployments never need this: the gateway only reads PEM files.
public struct CertificateAuthority: Sendable {
  public let certificate: Certificate
  public let privateKey: Certificate.PrivateKey
  public let trustDomain: String

  public init(certificate: Certificate, privateKey: Certificate.PrivateKey, trustDomain: String) {
    self.certificate = certificate
    self.privateKey = privateKey
    self.trustDomain = trustDomain
  }

  /// Makes a new self-signed root CA for `trustDomain`.
  public static func create(
    trustDomain: String,
    commonName: String? = nil,
    validity: TimeInterval = 10 * 365 * 86_400,
    now: Date = Date()
  ) throws -> CertificateAuthority {
    let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
    let name = try DistinguishedName {
      OrganizationName("Tollgate")
      CommonName(commonName ?? "Tollgate CA \(trustDomain)")
    }
    let extensions = try Certificate.Extensions {
      Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
      Critical(KeyUsage(keyCertSign: true, cRLSign: true))
      SubjectKeyIdentifier(hash: key.publicKey)
      SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://\(trustDomain)")])
    }
    let certificate = try Certificate(
      version: .v3,
      serialNumber: Certificate.SerialNumber(),
      publicKey: key.publicKey,
      notValidBefore: now.addingTimeInterval(-300),
      notValidAfter: now.addingTimeInterval(validity),
      issuer: name,
      subject: name,
      signatureAlgorithm: .ecdsaWithSHA256,
      extensions: extensions,
      issuerPrivateKey: key
    )
    return CertificateAuthority(certificate: certificate, privateKey: key, trustDomain: trustDomain)
  }

  /// What a certificate is for.
  public enum Subject: Sendable {
    /// A principal: the SPIFFE ID goes in the only URI SAN; extended key usage clientAuth.
    case principal(SPIFFEID)
    /// The gateway itself: DNS names and IP addresses; extended key usage serverAuth.
    case server(dnsNames: [String], ipAddresses: [String])
  }

  /// An issued certificate and its new private key.
  public struct Issued: Sendable {
    public let certificate: Certificate
    public let privateKey: Certificate.PrivateKey
  }

  /// Issues a certificate signed by this CA. `notBefore`/`validity` are parameters so tests can
  /// make expired and not-yet-valid certificates.
  public func issue(
    _ subject: Subject,
    validity: TimeInterval = 365 * 86_400,
    notBefore: Date? = nil,
    now: Date = Date()
  ) throws -> Issued {
    let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
    let start = notBefore ?? now.addingTimeInterval(-300)
    let commonName: String
    let sans: [GeneralName]
    let usage: ExtendedKeyUsage.Usage
    switch subject {
    case .principal(let id):
      commonName = id.name
      sans = [.uniformResourceIdentifier(id.description)]
      usage = .clientAuth
    case .server(let dnsNames, let ipAddresses):
      commonName = dnsNames.first ?? ipAddresses.first ?? "tollgate"
      sans = try dnsNames.map { .dnsName($0) } + ipAddresses.map { try .ipAddress(Self.ipBytes($0)) }
      usage = .serverAuth
    }
    let extensions = try Certificate.Extensions {
      Critical(BasicConstraints.notCertificateAuthority)
      Critical(KeyUsage(digitalSignature: true))
      try ExtendedKeyUsage([usage])
      SubjectKeyIdentifier(hash: key.publicKey)
      AuthorityKeyIdentifier(keyIdentifier: try certificate.extensions.subjectKeyIdentifier?.keyIdentifier)
      SubjectAlternativeNames(sans)
    }
    let issued = try Certificate(
      version: .v3,
      serialNumber: Certificate.SerialNumber(),
      publicKey: key.publicKey,
      notValidBefore: start,
      notValidAfter: start.addingTimeInterval(validity),
      issuer: certificate.subject,
      subject: try DistinguishedName {
        OrganizationName("Tollgate")
        CommonName(commonName)
      },
      signatureAlgorithm: .ecdsaWithSHA256,
      extensions: extensions,
      issuerPrivateKey: privateKey
    )
    return Issued(certificate: issued, privateKey: key)
  }

  struct BadAddress: Error, CustomStringConvertible {
    let text: String
    var description: String { "'\(text)' is not an IPv4 or IPv6 address" }
  }

  static func ipBytes(_ text: String) throws -> ASN1OctetString {
    var v4 = in_addr()
    if inet_pton(AF_INET, text, &v4) == 1 {
      return ASN1OctetString(contentBytes: withUnsafeBytes(of: v4) { ArraySlice($0) })
    }
    var v6 = in6_addr()
    if inet_pton(AF_INET6, text, &v6) == 1 {
      return ASN1OctetString(contentBytes: withUnsafeBytes(of: v6) { ArraySlice($0) })
    }
    throw BadAddress(text: text)
  }
}

extension SubjectKeyIdentifier {
  /// RFC 5280 method 1: SHA-1 of the subject public key bits (here SHA-256, truncated to 20 bytes,
  /// which RFC 7093 allows).
  init(hash key: Certificate.PublicKey) {
    let digest = SHA256.hash(data: key.subjectPublicKeyInfoBytes)
    self.init(keyIdentifier: ArraySlice(Array(digest).prefix(20)))
  }
}

/// PEM files as the gateway and clients read them.
public enum PEMFiles {
  public static func certificatePEM(_ certificate: Certificate) throws -> String {
    try certificate.serializeAsPEM().pemString
  }

  public static func privateKeyPEM(_ key: Certificate.PrivateKey) throws -> String {
    try key.serializeAsPEM().pemString
  }

  /// Writes `text` to `path` in one step (a reader sees the old file or the new one), readable
  /// only by the owner when `secret`.
  public static func write(_ text: String, to path: String, secret: Bool = false) throws {
    guard secret else {
      try Data(text.utf8).write(to: URL(fileURLWithPath: path), options: .atomic)
      try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: path)
      return
    }
    // Foundation's atomic write creates its file with the umask's mode (0644 as a rule) and
    // renames it into place, so narrowing it afterwards left a private key readable by every
    // local user for a moment, or for good if the process died in between. This file is the
    // owner's alone from its creation, then renamed into place.
    let temporary = "\(path).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw WriteError(path: path, errno: errno) }
    var written = false
    defer { if !written { unlink(temporary) } }
    let failure: Int32? = Array(text.utf8).withUnsafeBytes { bytes in
      var offset = 0
      while offset < bytes.count {
        let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
        if n < 0 {
          if errno == EINTR { continue }
          return errno
        }
        offset += n
      }
      return fsync(fd) == 0 ? nil : errno
    }
    let closed = close(fd) == 0 ? nil : errno
    if let error = failure ?? closed { throw WriteError(path: path, errno: error) }
    guard rename(temporary, path) == 0 else { throw WriteError(path: path, errno: errno) }
    written = true
  }

  public struct WriteError: Error, CustomStringConvertible {
    public let path: String
    public let errno: Int32
    public var description: String { "cannot write \(path): \(String(cString: strerror(errno)))" }
  }

  /// Loads a CA written by `tollctl certs init-ca` (ca.pem, ca.key, trust-domain).
  public static func loadAuthority(from directory: String) throws -> CertificateAuthority {
    let base = URL(fileURLWithPath: directory)
    let certPEM = try String(contentsOf: base.appendingPathComponent("ca.pem"), encoding: .utf8)
    let keyPEM = try String(contentsOf: base.appendingPathComponent("ca.key"), encoding: .utf8)
    let domain = try String(contentsOf: base.appendingPathComponent("trust-domain"), encoding: .utf8)
      .trimmingCharacters(in: .whitespacesAndNewlines)
    return CertificateAuthority(
      certificate: try Certificate(pemEncoded: certPEM),
      privateKey: try Certificate.PrivateKey(pemEncoded: keyPEM),
      trustDomain: domain
    )
  }

  /// Writes a CA as ca.pem, ca.key (0600) and trust-domain into `directory`.
  public static func saveAuthority(_ ca: CertificateAuthority, to directory: String) throws {
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    let base = URL(fileURLWithPath: directory)
    try write(try certificatePEM(ca.certificate) + "\n", to: base.appendingPathComponent("ca.pem").path)
    try write(try privateKeyPEM(ca.privateKey), to: base.appendingPathComponent("ca.key").path, secret: true)
    try write(ca.trustDomain + "\n", to: base.appendingPathComponent("trust-domain").path)
  }

  /// Writes an issued certificate as cert.pem, key.pem (0600) and the issuing CA as ca.pem.
  public static func saveIssued(_ issued: CertificateAuthority.Issued, ca: CertificateAuthority, to directory: String) throws {
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    let base = URL(fileURLWithPath: directory)
    try write(try certificatePEM(issued.certificate) + "\n", to: base.appendingPathComponent("cert.pem").path)
    try write(try privateKeyPEM(issued.privateKey), to: base.appendingPathComponent("key.pem").path, secret: true)
    try write(try certificatePEM(ca.certificate) + "\n", to: base.appendingPathComponent("ca.pem").path)
  }
}
