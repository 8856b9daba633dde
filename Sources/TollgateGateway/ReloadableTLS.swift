import Foundation
import GRPCNIOTransportHTTP2
import Logging
import NIOCertificateReloading
import NIOCore
import NIOSSL
import ServiceLifecycle
import SwiftASN1
import Synchronization
import TollgateCore
import UnixSignals
import X509

/// The server's TLS material, replaceable while the gateway runs: on SIGHUP, or when one of the
/// three files changes, the certificate, key and client CA are read and checked again as at start;
/// good material is used for every new connection from then on, and connections already open keep
/// theirs. Bad material (unreadable, a key that does not match, no certificate) is refused with an
/// error log line naming the setting, and the old material stays in use.
///
/// The chain and key reach new handshakes through NIOSSL's certificate reloader hook. The client
/// CA has no such hook, so client certificates are verified here, against the current CA bundle,
/// with swift-certificates' RFC 5280 verifier.
final class ReloadableTLS: CertificateReloader, Sendable {
  struct Material: Sendable {
    var chain: [NIOSSLCertificate]
    var key: NIOSSLPrivateKey
    var roots: [X509.Certificate]
    var pem: TLSMaterial
  }

  let config: GatewayConfig
  let logger: Logger
  private let current: Mutex<Material>
  /// Modification times of the three files as last loaded.
  private let stamps = Mutex<[Date?]>([])

  init(config: GatewayConfig, material: TLSMaterial, logger: Logger) throws(ConfigError) {
    self.config = config
    self.logger = logger
    self.current = Mutex(try Self.parse(material))
    stamps.withLock { $0 = Self.modificationTimes(config) }
  }

  static func parse(_ material: TLSMaterial) throws(ConfigError) -> Material {
    do {
      let chain = try material.certificateChain.map { try NIOSSLCertificate(bytes: $0, format: .der) }
      let key = try NIOSSLPrivateKey(bytes: material.privateKeyPEM, format: .pem)
      let roots = try material.clientCAs.map { try X509.Certificate(derEncoded: $0) }
      return Material(chain: chain, key: key, roots: roots, pem: material)
    } catch {
      throw ConfigError(nil, "TLS material cannot be used: \(error)")
    }
  }

  static func modificationTimes(_ config: GatewayConfig) -> [Date?] {
    [config.tlsCertificatePath, config.tlsKeyPath, config.clientCAPath].map {
      (try? FileManager.default.attributesOfItem(atPath: $0))?[.modificationDate] as? Date
    }
  }

  var material: Material { current.withLock { $0 } }

  var sslContextConfigurationOverride: NIOSSLContextConfigurationOverride {
    let material = self.material
    var override = NIOSSLContextConfigurationOverride()
    override.certificateChain = material.chain.map { .certificate($0) }
    override.privateKey = .privateKey(material.key)
    return override
  }

  /// Reads and checks the files again; installs them only if they are good. Returns whether it did.
  @discardableResult
  func reload(reason: String) -> Bool {
    do {
      let material = try Self.parse(try TLSMaterial.load(config))
      current.withLock { $0 = material }
      stamps.withLock { $0 = Self.modificationTimes(config) }
      logger.notice("TLS material reloaded; new connections use it", metadata: ["trigger": "\(reason)"])
      return true
    } catch {
      // Remember the stamps anyway, so a bad file is reported once, not every second.
      stamps.withLock { $0 = Self.modificationTimes(config) }
      logger.error(
        "TLS material refused; the previous certificate, key and client CA stay in use",
        metadata: ["trigger": "\(reason)", "error": "\(error)"]
      )
      return false
    }
  }

  /// Whether any of the files changed since they were last read.
  var filesChanged: Bool { stamps.withLock { $0 } != Self.modificationTimes(config) }

  /// Server TLS requiring a client certificate that chains to the current client CA bundle.
  var transportSecurity: HTTP2ServerTransport.Posix.TransportSecurity {
    let pem = material.pem
    return .mTLS(
      certificateChain: pem.certificateChain.map { .bytes($0, format: .der) },
      privateKey: .bytes(pem.privateKeyPEM, format: .pem)
    ) {
      $0.trustRoots = .certificates(pem.clientCAs.map { .bytes($0, format: .der) })
      $0.clientCertificateVerification = .noHostnameVerification
      $0.certificateReloader = self
      $0.customVerificationCallback = { [self] certificates, promise in verify(certificates, promise) }
    }
  }

  /// Verifies a client's chain (leaf first, as presented) against the current client CA bundle.
  func verify(_ presented: [NIOSSLCertificate], _ promise: EventLoopPromise<NIOSSLVerificationResultWithMetadata>) {
    let roots = material.roots
    Task {
      do {
        let chain = try presented.map { try X509.Certificate(derEncoded: try $0.toDERBytes()) }
        guard let leaf = chain.first else { return promise.succeed(.failed) }
        var verifier = Verifier(rootCertificates: CertificateStore(roots)) {
          RFC5280Policy(validationTime: Date())
        }
        switch await verifier.validate(leaf: leaf, intermediates: CertificateStore(chain.dropFirst())) {
        case .validCertificate:
          // No chain in the metadata: given one, the transport re-parses every certificate of it
          // for every call on the connection; without, it parses only the leaf, which is all
          // identity reads.
          promise.succeed(.certificateVerified(VerificationMetadata(nil)))
        case .couldNotValidate:
          promise.succeed(.failed)
        }
      } catch {
        promise.succeed(.failed)
      }
    }
  }
}

/// Reloads the TLS material on SIGHUP and, unless `interval` is nil, when its files change
/// (checked every `interval`).
struct TLSReloadService: Service {
  let tls: ReloadableTLS
  let interval: Duration?

  func run() async throws {
    let hangups = await UnixSignalsSequence(trapping: .sighup)
    guard let interval else {
      for await _ in hangups.cancelOnGracefulShutdown() { tls.reload(reason: "SIGHUP") }
      return
    }
    await withTaskGroup(of: Void.self) { group in
      group.addTask {
        for await _ in hangups.cancelOnGracefulShutdown() { tls.reload(reason: "SIGHUP") }
      }
      group.addTask {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
          if tls.filesChanged { tls.reload(reason: "file changed") }
          try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
        }
      }
      await group.next()
      group.cancelAll()
    }
  }
}
