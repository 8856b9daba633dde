public import Crypto
import Foundation

/// A C2SP tlog-checkpoint signed with an Ed25519 note signature (C2SP signed-note).
///
/// Body: `<origin>\n<tree size>\n<base64 root hash>\n`. Signed note: the body, an empty line,
/// then `— <key name> <base64(key ID || signature)>\n`, where the key ID is the first four bytes
/// of `SHA-256(<key name> || 0x0A || 0x01 || <32-byte public key>)` (0x01 = Ed25519).
public struct Checkpoint: Sendable, Hashable {
  public var origin: String
  public var treeSize: UInt64
  public var rootHash: [UInt8]

  public init(origin: String, treeSize: UInt64, rootHash: [UInt8]) {
    self.origin = origin
    self.treeSize = treeSize
    self.rootHash = rootHash
  }

  /// The exact bytes that are signed.
  public var body: String {
    "\(origin)\n\(treeSize)\n\(Data(rootHash).base64EncodedString())\n"
  }

  /// Parses a checkpoint body (the text before the blank line of a signed note).
  public init?(body: String) {
    guard body.hasSuffix("\n") else { return nil }
    let lines = body.dropLast().split(separator: "\n", omittingEmptySubsequences: false)
    guard lines.count >= 3, !lines[0].isEmpty, let size = UInt64(lines[1]),
      let root = Data(base64Encoded: String(lines[2])), root.count == 32
    else { return nil }
    self.init(origin: String(lines[0]), treeSize: size, rootHash: Array(root))
  }
}

/// An Ed25519 note signer/verifier identity: a key name and its key.
public enum NoteSignature {
  /// The four-byte key ID of a named Ed25519 public key.
  public static func keyID(name: String, publicKey: [UInt8]) -> [UInt8] {
    var data = Array(name.utf8)
    data.append(0x0A)
    data.append(0x01)
    data += publicKey
    return Array(SHA256.hash(data: data).prefix(4))
  }

  /// `body` followed by the blank line and one signature line.
  public static func sign(body: String, keyName: String, key: Curve25519.Signing.PrivateKey) throws -> String {
    let signature = try key.signature(for: Array(body.utf8))
    let blob = keyID(name: keyName, publicKey: Array(key.publicKey.rawRepresentation)) + Array(signature)
    return body + "\n" + "\u{2014} \(keyName) \(Data(blob).base64EncodedString())\n"
  }

  /// Why a signed note did not verify.
  public enum Failure: Error, Equatable, Sendable {
    case malformed
    case noSignatureByKey(String)
    case badSignature
  }

  /// Verifies that `note` carries a valid signature by `keyName`/`publicKey`; returns the body.
  public static func verify(note: String, keyName: String, publicKey: [UInt8]) throws(Failure) -> String {
    guard let split = note.range(of: "\n\n") else { throw .malformed }
    let body = String(note[..<split.lowerBound]) + "\n"
    let signatures = note[split.upperBound...].split(separator: "\n")
    let wantedID = keyID(name: keyName, publicKey: publicKey)
    guard let key = try? Curve25519.Signing.PublicKey(rawRepresentation: publicKey) else { throw .malformed }
    for line in signatures {
      let parts = line.split(separator: " ")
      guard parts.count == 3, parts[0] == "\u{2014}", parts[1] == keyName,
        let blob = Data(base64Encoded: String(parts[2])), blob.count == 68,
        Array(blob.prefix(4)) == wantedID
      else { continue }
      guard key.isValidSignature(blob.dropFirst(4), for: Array(body.utf8)) else { throw .badSignature }
      return body
    }
    throw .noSignatureByKey(keyName)
  }
}
