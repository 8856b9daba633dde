import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// Ends a connection whose peer stops acknowledging what the gateway sends (TCP_USER_TIMEOUT).
///
/// The server's keepalive cannot: in grpc-swift-nio-transport 2.9.2 an unanswered ping starts a
/// graceful shutdown, which sends GOAWAY and a ping and waits for that ping's answer before it
/// closes anything, and waits for open streams too. A peer that vanished without a reset (a NAT
/// or firewall dropping the connection's state, a host gone) answers neither, so its streams
/// stayed open until the kernel gave up retransmitting, about 15 minutes: a worker's dead stream
/// kept being offered tasks, each lost until its lease expired. With this option the kernel
/// gives up once data (the keepalive ping, or anything else) has gone unacknowledged for
/// `limit`, and the connection and its streams end. gRPC core sets it the same way, from the
/// keepalive timeout.
enum TCPUserTimeout {
  static func apply(_ limit: Duration, to channel: any Channel) -> EventLoopFuture<Void> {
    #if os(Linux)
    let (seconds, attoseconds) = limit.components
    let milliseconds = Int(clamping: seconds * 1_000 + attoseconds / 1_000_000_000_000_000)
    return channel.setOption(.tcpOption(.init(rawValue: CInt(TCP_USER_TIMEOUT))), value: milliseconds)
    #else
    return channel.eventLoop.makeSucceededVoidFuture()
    #endif
  }
}
