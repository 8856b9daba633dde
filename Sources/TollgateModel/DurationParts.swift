extension Duration {
  /// Whole milliseconds, rounded toward zero (what SQL intervals and gRPC's
  /// `grpc-retry-pushback-ms` take).
  public var wholeMilliseconds: Int64 {
    let (seconds, attoseconds) = components
    return seconds * 1000 + attoseconds / 1_000_000_000_000_000
  }
}
