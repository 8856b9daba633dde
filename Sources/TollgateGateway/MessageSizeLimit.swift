import NIOCore
import NIOHPACK
import NIOHTTP2

/// Refuses a request message larger than the limit with RESOURCE_EXHAUSTED.
///
/// grpc-swift-nio-transport enforces its own payload limit by resetting the HTTP/2 stream, which
/// clients report as UNAVAILABLE (retryable, and wrong). This handler sits in front of the
/// transport's stream handler, follows the gRPC length-prefixed framing of the request body,
/// and on the first message over the limit answers trailers-only with `grpc-status: 8` and a
/// message naming the sizes, then resets the stream with NO_ERROR. The oversized bytes are never forwarded,
/// so nothing is decoded or run.
final class MessageSizeLimitHandler: ChannelDuplexHandler, RemovableChannelHandler {
  typealias InboundIn = HTTP2Frame.FramePayload
  typealias InboundOut = HTTP2Frame.FramePayload
  typealias OutboundIn = HTTP2Frame.FramePayload
  typealias OutboundOut = HTTP2Frame.FramePayload

  private let limit: Int
  /// Bytes of the 5-byte message prefix seen so far (flag + 4-byte big-endian length).
  private var prefix: [UInt8] = []
  /// Body bytes of the current message still to come.
  private var remaining = 0
  private var refused = false
  /// Whether the response's initial HEADERS already went out (a streaming RPC may have sent them).
  private var responseStarted = false

  init(limit: Int) {
    self.limit = limit
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    if refused { return }
    let payload = unwrapInboundIn(data)
    guard case .data(let frame) = payload, case .byteBuffer(var buffer) = frame.data else {
      context.fireChannelRead(data)
      return
    }
    while buffer.readableBytes > 0 {
      if remaining > 0 {
        let take = min(remaining, buffer.readableBytes)
        buffer.moveReaderIndex(forwardBy: take)
        remaining -= take
        continue
      }
      prefix.append(buffer.readInteger(as: UInt8.self)!)
      guard prefix.count == 5 else { continue }
      let length = Int(prefix[1]) << 24 | Int(prefix[2]) << 16 | Int(prefix[3]) << 8 | Int(prefix[4])
      prefix.removeAll(keepingCapacity: true)
      if length > limit {
        refuse(context: context, length: length)
        return
      }
      remaining = length
    }
    context.fireChannelRead(data)
  }

  func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
    if refused {
      // The stream is answered; the RPC's own late writes have nowhere to go.
      promise?.fail(ChannelError.ioOnClosedChannel)
      return
    }
    if case .headers = unwrapOutboundIn(data) { responseStarted = true }
    context.write(data, promise: promise)
  }

  private func refuse(context: ChannelHandlerContext, length: Int) {
    refused = true
    var headers: HPACKHeaders = responseStarted ? [:] : [":status": "200", "content-type": "application/grpc"]
    headers.add(name: "grpc-status", value: "8")
    headers.add(name: "grpc-message", value: "request message is \(length) bytes; this gateway accepts at most \(limit)")
    let trailers = HTTP2Frame.FramePayload.headers(.init(headers: headers, endStream: true))
    context.write(wrapOutboundOut(trailers), promise: nil)
    // The client may still be sending the rest of the message. RST_STREAM with NO_ERROR after an
    // early response tells it to stop while keeping the status (gRPC over HTTP/2); a plain close
    // would reset with CANCEL, which clients report instead of the status.
    context.writeAndFlush(wrapOutboundOut(.rstStream(.noError)), promise: nil)
  }
}
