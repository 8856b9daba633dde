public import Crypto
import Foundation

/// The Ed25519 key that signs checkpoints, in the text forms of Go's golang.org/x/mod/sumdb/note
/// (which C2SP signed-note tooling reads):
///
/// - signer (secret): `PRIVATE+KEY+<name>+<key id hex>+<base64(0x01 || 32-byte seed)>`
/// - verifier (public): `<name>+<key id hex>+<base64(0x01 || 32-byte public key)>`
///
/// The key id is the first four bytes of `SHA-256(name || 0x0A || 0x01 || public key)`.
public struct AuditSigningKey: Sendable {
  public let name: String
  /// The 32-byte seed; the key type itself is not Sendable.
  let seed: [UInt8]
  public let publicKey: [UInt8]

  var privateKey: Curve25519.Signing.PrivateKey {
    // The seed was valid when this value was made.
    try! Curve25519.Signing.PrivateKey(rawRepresentation: seed)
  }

  public init(name: String, privateKey: Curve25519.Signing.PrivateKey = .init()) throws(KeyFormatError) {
    try Self.checkName(name)
    self.name = name
    self.seed = Array(privateKey.rawRepresentation)
    self.publicKey = Array(privateKey.publicKey.rawRepresentation)
  }

  public struct KeyFormatError: Error, CustomStringConvertible, Equatable {
    public let description: String
  }

  static func checkName(_ name: String) throws(KeyFormatError) {
    guard !name.isEmpty, !name.contains("+"), !name.contains(where: { $0.isWhitespace }) else {
      throw KeyFormatError(description: "key name '\(name)' must be non-empty, with no '+' and no spaces")
    }
  }

  static func keyIDHex(name: String, publicKey: [UInt8]) -> String {
    NoteSignature.keyID(name: name, publicKey: publicKey).map { String(format: "%02x", $0) }.joined()
  }

  /// The signer line to store in a private file.
  public var signerText: String {
    "PRIVATE+KEY+\(name)+\(Self.keyIDHex(name: name, publicKey: publicKey))+"
      + Data([0x01] + seed).base64EncodedString()
  }

  /// The verifier line to publish.
  public var verifierText: String { AuditVerifierKey(name: name, publicKey: publicKey).text }

  /// Parses a signer line (surrounding whitespace ignored).
  public init(signerText: String) throws(KeyFormatError) {
    // The base64 key may itself contain '+', so only the first four separate fields.
    let parts = signerText.trimmingCharacters(in: .whitespacesAndNewlines)
      .split(separator: "+", maxSplits: 4, omittingEmptySubsequences: false)
    guard parts.count == 5, parts[0] == "PRIVATE", parts[1] == "KEY" else {
      throw KeyFormatError(description: "not a signing key: expected PRIVATE+KEY+<name>+<id>+<key> (made by 'tollctl certs audit-key')")
    }
    guard let raw = Data(base64Encoded: String(parts[4])), raw.count == 33, raw.first == 0x01,
      let key = try? Curve25519.Signing.PrivateKey(rawRepresentation: raw.dropFirst())
    else {
      throw KeyFormatError(description: "signing key is not a base64 Ed25519 key (0x01 followed by 32 bytes)")
    }
    try self.init(name: String(parts[2]), privateKey: key)
    guard Self.keyIDHex(name: name, publicKey: publicKey) == parts[3].lowercased() else {
      throw KeyFormatError(description: "signing key id \(parts[3]) does not match its name and key; the file is damaged")
    }
  }

  /// Signs `checkpoint`, returning the complete signed note.
  public func sign(_ checkpoint: Checkpoint) throws -> String {
    try NoteSignature.sign(body: checkpoint.body, keyName: name, key: privateKey)
  }
}

/// A published verifier key: what an auditor needs to check checkpoints.
public struct AuditVerifierKey: Sendable, Hashable {
  public let name: String
  public let publicKey: [UInt8]

  public init(name: String, publicKey: [UInt8]) {
    self.name = name
    self.publicKey = publicKey
  }

  public var text: String {
    "\(name)+\(AuditSigningKey.keyIDHex(name: name, publicKey: publicKey))+"
      + Data([0x01] + publicKey).base64EncodedString()
  }

  public init(text: String) throws(AuditSigningKey.KeyFormatError) {
    let parts = text.trimmingCharacters(in: .whitespacesAndNewlines)
      .split(separator: "+", maxSplits: 2, omittingEmptySubsequences: false)
    guard parts.count == 3 else {
      throw .init(description: "not a verifier key: expected <name>+<id>+<base64 key>")
    }
    guard let raw = Data(base64Encoded: String(parts[2])), raw.count == 33, raw.first == 0x01 else {
      throw .init(description: "verifier key is not a base64 Ed25519 public key (0x01 followed by 32 bytes)")
    }
    try AuditSigningKey.checkName(String(parts[0]))
    self.init(name: String(parts[0]), publicKey: Array(raw.dropFirst()))
    guard AuditSigningKey.keyIDHex(name: name, publicKey: publicKey) == parts[1].lowercased() else {
      throw .init(description: "verifier key id \(parts[1]) does not match its name and key; the text is damaged")
    }
  }
}
