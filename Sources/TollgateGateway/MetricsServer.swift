import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import ServiceLifecycle
import Synchronization
import TollgateCore
import TollgateModel

/// Serves `GET /metrics` (Prometheus text format) over plain HTTP/1.1 on `--metrics-listen`.
/// Plain text on purpose: scrapers rarely hold client certificates, and the data is aggregate
/// counts with bounded labels; bind it to a private interface.
final class MetricsServer: Service, Sendable {
  let address: GatewayConfig.Address
  let metrics: GatewayMetrics
  let logger: Logger
  private let boundPort = Mutex<Int?>(nil)
  private let bound = ReadinessGate()

  init(address: GatewayConfig.Address, metrics: GatewayMetrics, logger: Logger) {
    self.address = address
    self.metrics = metrics
    self.logger = logger
  }

  /// The bound port, once listening (useful with port 0); nil if binding failed.
  func listeningPort() async -> Int? {
    await bound.wait()
    return boundPort.withLock { $0 }
  }

  func run() async throws {
    let metrics = self.metrics
    let channel: any Channel
    do {
      channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .childChannelInitializer { channel in
          channel.pipeline.configureHTTPServerPipeline().flatMapThrowing {
            try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(metrics: metrics))
          }
        }
        .bind(host: address.host, port: address.port)
        .get()
    } catch {
      bound.open()
      throw ListenFailure(address: address, cause: error, setting: .metricsListen)
    }
    let port = channel.localAddress?.port
    boundPort.withLock { $0 = port }
    bound.open()
    logger.info("metrics listening", metadata: ["host": "\(address.host)", "port": "\(port ?? address.port)"])
    try await withGracefulShutdownHandler {
      try await channel.closeFuture.get()
    } onGracefulShutdown: {
      channel.close(promise: nil)
    }
  }
}

final class MetricsHTTPHandler: ChannelInboundHandler, Sendable {
  typealias InboundIn = HTTPServerRequestPart
  typealias OutboundOut = HTTPServerResponsePart

  let metrics: GatewayMetrics

  init(metrics: GatewayMetrics) {
    self.metrics = metrics
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    guard case .head(let request) = unwrapInboundIn(data) else { return }
    let found = request.method == .GET && (request.uri == "/metrics" || request.uri.hasPrefix("/metrics?"))
    let body: [UInt8] = found ? metrics.exposition() : Array("not found; scrape /metrics\n".utf8)
    var headers = HTTPHeaders()
    headers.add(name: "Content-Type", value: found ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain")
    headers.add(name: "Content-Length", value: String(body.count))
    headers.add(name: "Connection", value: "close")
    let head = HTTPResponseHead(version: request.version, status: found ? .ok : .notFound, headers: headers)
    context.write(wrapOutboundOut(.head(head)), promise: nil)
    context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: body)))), promise: nil)
    context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in context.close(promise: nil) }
  }
}
