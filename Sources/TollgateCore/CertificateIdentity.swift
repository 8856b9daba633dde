import Crypto
public import Foundation
import SwiftASN1
import Synchronization
public import TollgateModel
public import X509

/// Turns a verified client certificate into a ``Principal``.
///
/// The TLS handshake has already checked the chain against the client CA and the validity
/// window; this adds what TLS cannot know: exactly one SPIFFE URI SAN, of the configured trust
/// domain, in the Tollgate form. Validity is checked again here so a clock-skewed handshake
/// library or a cached session cannot admit an expired certificate.
public struct CertificateIdentity: Sendable {
  public let trustDomain: String
  private let now: @Sendable () -> Date
  private let known = KnownPrincipals()

  public init(trustDomain: String, now: @escaping @Sendable () -> Date = { Date() }) {
    self.trustDomain = trustDomain
    self.now = now
  }

  /// The principal `certificate` identifies, or UNAUTHENTICATED with the reason.
  ///
  /// Every call on a connection presents the same certificate, and reading one (its SAN, and a
  /// re-encoding for the fingerprint) cost more than the rest of a refused call's identity work;
  /// so a certificate read once is remembered, keyed by its exact bytes. Validity is still checked
  /// on every call, and revocation is checked by the caller on every call.
  public func principal(from certificate: Certificate) throws(TollgateError) -> Principal {
    let time = now()
    guard certificate.notValidBefore <= time, time <= certificate.notValidAfter else {
      throw .unauthenticated("client certificate is outside its validity period")
    }
    if let principal = known.principal(for: certificate) { return principal }
    let principal = try read(certificate)
    known.remember(principal, for: certificate)
    return principal
  }

  private func read(_ certificate: Certificate) throws(TollgateError) -> Principal {
    let uris: [String]
    do {
      let names = try certificate.extensions.subjectAlternativeNames
      uris = (names.map(Array.init) ?? []).compactMap {
        if case .uniformResourceIdentifier(let uri) = $0 { return uri }
        return nil
      }
    } catch {
      throw .unauthenticated("client certificate has an unreadable subjectAltName extension")
    }
    let spiffeURIs = uris.filter { $0.lowercased().hasPrefix("spiffe://") }
    guard spiffeURIs.count == 1, let uri = spiffeURIs.first else {
      throw .unauthenticated(
        "client certificate must carry exactly one SPIFFE ID URI SAN, found \(spiffeURIs.count)"
      )
    }
    let id: SPIFFEID
    do {
      id = try SPIFFEID(parsing: uri, expectedTrustDomain: trustDomain)
    } catch {
      throw .unauthenticated(error.description)
    }
    let fingerprint: String
    do {
      fingerprint = try Self.sha256Fingerprint(certificate)
    } catch {
      throw .unauthenticated("client certificate could not be re-encoded")
    }
    return Principal(
      spiffeID: id,
      certificateSHA256: fingerprint,
      serialHex: RevocationTarget.canonicalSerial(HexText.encode(certificate.serialNumber.bytes)),
      validUntil: certificate.notValidAfter
    )
  }

  /// Lowercase hex SHA-256 of the certificate's DER encoding (what `openssl x509 -fingerprint
  /// -sha256` prints, without colons).
  public static func sha256Fingerprint(_ certificate: Certificate) throws -> String {
    var serializer = DER.Serializer()
    try serializer.serialize(certificate)
    return HexText.encode(SHA256.hash(data: serializer.serializedBytes))
  }
}

/// Principals of certificates already read, by the certificates' exact DER bytes (`Certificate`'s
/// equality), bounded: when full it starts over, which costs one re-read per live certificate.
final class KnownPrincipals: Sendable {
  static let capacity = 10_000
  private let principals = Mutex<[Certificate: Principal]>([:])

  func principal(for certificate: Certificate) -> Principal? {
    principals.withLock { $0[certificate] }
  }

  func remember(_ principal: Principal, for certificate: Certificate) {
    principals.withLock { principals in
      if principals.count >= Self.capacity { principals.removeAll(keepingCapacity: true) }
      principals[certificate] = principal
    }
  }
}
