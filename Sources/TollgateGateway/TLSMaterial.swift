import Foundation
import GRPCNIOTransportHTTP2
import NIOSSL
import SwiftASN1
import TollgateCore
import X509

/// The server's certificate chain, key and client CA bundle, read and checked at start so that a
/// wrong file stops start-up with a message naming the setting, not a failed handshake later.
struct TLSMaterial {
  /// The server's chain, leaf first, and the client CA bundle, as DER.
  let certificateChain: [[UInt8]]
  let privateKeyPEM: [UInt8]
  let clientCAs: [[UInt8]]

  static func load(_ config: GatewayConfig) throws(ConfigError) -> TLSMaterial {
    let chainFile = try read(config.tlsCertificatePath, .tlsCert)
    let key = try read(config.tlsKeyPath, .tlsKey)
    let caFile = try read(config.clientCAPath, .clientCA)

    let chain: [[UInt8]]
    let leaf: X509.Certificate
    do {
      chain = try PEMCertificates.der(chainFile)
      guard let first = chain.first else { throw ConfigError(.tlsCert, "contains no PEM certificate") }
      leaf = try X509.Certificate(derEncoded: first)
    } catch let error as ConfigError {
      throw error
    } catch {
      throw ConfigError(.tlsCert, "is not a PEM certificate chain: \(error)")
    }
    do {
      let parsed = try X509.Certificate.PrivateKey(pemEncoded: String(decoding: key, as: UTF8.self))
      guard parsed.publicKey == leaf.publicKey else {
        throw ConfigError(.tlsKey, "does not match the certificate in \(ConfigSetting.tlsCert.flag)")
      }
    } catch let error as ConfigError {
      throw error
    } catch {
      throw ConfigError(.tlsKey, "is not a PEM private key (PKCS#8, SEC1 or PKCS#1): \(error)")
    }
    let cas: [[UInt8]]
    do {
      cas = try PEMCertificates.der(caFile)
      guard !cas.isEmpty else { throw ConfigError(.clientCA, "contains no PEM certificate") }
      for ca in cas { _ = try X509.Certificate(derEncoded: ca) }
    } catch let error as ConfigError {
      throw error
    } catch {
      throw ConfigError(.clientCA, "is not a PEM certificate bundle: \(error)")
    }
    return TLSMaterial(certificateChain: chain, privateKeyPEM: key, clientCAs: cas)
  }

  private static func read(_ path: String, _ setting: ConfigSetting) throws(ConfigError) -> [UInt8] {
    do {
      return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    } catch {
      throw ConfigError(setting, "names \(path), which cannot be read: \(error.localizedDescription)")
    }
  }
}

/// The certificates of a PEM file, as DER. Read here rather than by BoringSSL so that bundles
/// made by `cat a.pem b.pem`, where one file lacks its final newline and the END and BEGIN lines
/// run together, still read as two certificates.
enum PEMCertificates {
  struct Malformed: Error, CustomStringConvertible {
    let index: Int
    var description: String { "certificate \(index + 1) is not valid base64 between its BEGIN and END lines" }
  }

  static func der(_ file: [UInt8]) throws -> [[UInt8]] {
    let text = String(decoding: file, as: UTF8.self)
    let begin = "-----BEGIN CERTIFICATE-----"
    let end = "-----END CERTIFICATE-----"
    var out: [[UInt8]] = []
    var rest = text[...]
    while let start = rest.range(of: begin) {
      guard let stop = rest.range(of: end, range: start.upperBound..<rest.endIndex) else {
        throw Malformed(index: out.count)
      }
      let body = rest[start.upperBound..<stop.lowerBound].filter { !$0.isWhitespace }
      guard let der = Data(base64Encoded: String(body)) else { throw Malformed(index: out.count) }
      out.append(Array(der))
      rest = rest[stop.upperBound...]
    }
    return out
  }
}
