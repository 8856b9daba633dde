/// What the gateway says when it ends a stream because the caller's certificate expired.
public enum CertificateExpiry {
  /// Ends that UNAUTHENTICATED message. Clients that reconnect on their own (tollctl's long-lived
  /// commands) look for it: their identity files may hold a renewed certificate by now, where any
  /// other UNAUTHENTICATED would only be refused again.
  public static let reconnectAdvice = "reconnect with a renewed certificate"
}
