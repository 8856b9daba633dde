extension Duration {
  /// Whole milliseconds, rounded toward zero (what SQL intervals and gRPC's
  /// `grpc-retry-pushback-ms` take).
  public var wholeMilliseconds: Int64 {
    let (seconds, attoseconds) = components
    return seconds * 1000 + attoseconds / 1_000_000_000_000_000
  }
}

extension Duration {
  /// Seconds as a floating-point number (rates and timings).
  public var seconds: Double {
    let (seconds, attoseconds) = components
    return Double(seconds) + Double(attoseconds) / 1e18
  }
}
