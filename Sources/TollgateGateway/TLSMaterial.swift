import Foundation
public import GRPCNIOTransportHTTP2
import NIOSSL
import SwiftASN1
import TollgateCore
import X509

/// The server's certificate chain, key and client CA bundle, read and checked at start so that a
/// wrong file stops start-up with a message naming the setting, not a failed handshake later.
struct TLSMaterial {
  let certificateChainPEM: [UInt8]
  let privateKeyPEM: [UInt8]
  let clientCAPEM: [UInt8]

  static func load(_ config: GatewayConfig) throws(ConfigError) -> TLSMaterial {
    let chain = try read(config.tlsCertificatePath, .tlsCert)
    let key = try read(config.tlsKeyPath, .tlsKey)
    let ca = try read(config.clientCAPath, .clientCA)

    let leaf: X509.Certificate
    do {
      let certs = try NIOSSLCertificate.fromPEMBytes(chain)
      guard let first = certs.first else { throw ConfigError(.tlsCert, "contains no PEM certificate") }
      leaf = try X509.Certificate(derEncoded: try first.toDERBytes())
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
    do {
      guard try !NIOSSLCertificate.fromPEMBytes(ca).isEmpty else {
        throw ConfigError(.clientCA, "contains no PEM certificate")
      }
    } catch let error as ConfigError {
      throw error
    } catch {
      throw ConfigError(.clientCA, "is not a PEM certificate bundle: \(error)")
    }
    return TLSMaterial(certificateChainPEM: chain, privateKeyPEM: key, clientCAPEM: ca)
  }

  private static func read(_ path: String, _ setting: ConfigSetting) throws(ConfigError) -> [UInt8] {
    do {
      return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    } catch {
      throw ConfigError(setting, "names \(path), which cannot be read: \(error.localizedDescription)")
    }
  }
}
