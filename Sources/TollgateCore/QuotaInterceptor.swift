public import GRPCCore
import Foundation
public import TollgateModel

/// Last in the chain, after authorization: admits the call under its tenant's rate for the
/// method's quota class and its tenant's concurrent-call limit, or refuses it with
/// RESOURCE_EXHAUSTED before the handler runs.
///
/// Only principals of a tenant are limited. Operators are not: they administer quotas, and an
/// operator locked out by the limit it must raise could not raise it.
///
/// An ingest stream is also charged per received message. When it is over its rate, the handler's
/// next read waits for the admission instead of failing the stream; while nobody reads, HTTP/2
/// flow control stops the agent sending, so an over-limit agent is slowed, not cut off.
public struct QuotaInterceptor: ServerInterceptor {
  private let policy: AuthorizationPolicy
  private let directory: IdentityDirectory
  private let limiter: QuotaLimiter
  private let telemetry: Telemetry

  public init(policy: AuthorizationPolicy, directory: IdentityDirectory, limiter: QuotaLimiter, telemetry: Telemetry) {
    self.policy = policy
    self.directory = directory
    self.limiter = limiter
    self.telemetry = telemetry
  }

  public func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    guard let tenant = try CallScope.required().principal.tenant,
      let rule = policy.rule(for: context.descriptor)
    else {
      return try await next(request, context)
    }
    let quota = directory.snapshot.quotas[tenant] ?? .defaults
    let key = QuotaKey(tenant: tenant, quotaClass: rule.quotaClass)
    let limit = quota.rateLimits[rule.quotaClass] ?? QuotaSettings.defaults.rateLimits[rule.quotaClass]!
    let labels = [("tenant", telemetry.tenantLabel(tenant)), ("class", rule.quotaClass.rawValue)]
    let decision = limiter.admit(key, limit: limit)
    if decision != .admitted {
      telemetry.count("tollgate_quota_refused_total", labels + [("reason", "rate")])
    }
    try Self.check(decision, key: key, limit: limit)
    guard limiter.enter(tenant, limit: quota.maxConcurrentCalls) else {
      telemetry.count("tollgate_quota_refused_total", labels + [("reason", "concurrency")])
      throw TollgateError.resourceExhausted(
        "tenant '\(tenant)' already has \(quota.maxConcurrentCalls) calls open (its max_concurrent_calls); "
          + "finish or close some, or ask an operator to raise the limit",
        subject: "tenant:\(tenant)",
        description: "max_concurrent_calls \(quota.maxConcurrentCalls)",
        retryAfter: nil
      )
    }
    telemetry.count("tollgate_quota_admitted_total", labels)
    let slot = CallSlot(limiter: limiter, tenant: tenant)

    var request = request
    if rule.quotaClass == .ingest, MethodCatalog.shape(of: context.descriptor)?.clientStreaming == true {
      let limiter = self.limiter
      let directory = self.directory
      let telemetry = self.telemetry
      request.messages = RPCAsyncSequence(
        wrapping: PacedSequence(base: request.messages) {
          // Read per message, so a quota raised mid-stream speeds the stream up at once.
          let quota = directory.snapshot.quotas[tenant] ?? .defaults
          let limit = quota.rateLimits[.ingest] ?? limit
          let wait = limiter.reserve(key, limit: limit)
          telemetry.count("tollgate_quota_admitted_total", labels)
          if wait > .zero {
            telemetry.record("tollgate_quota_stream_paced_seconds", labels, wait)
            try await Task.sleep(for: wait)
          }
        }
      )
    }

    // The slot is held until the response's producer has run: for a stream, until it ends.
    return try await next(request, context).holding(slot)
  }

  /// Throws RESOURCE_EXHAUSTED with QuotaFailure, RetryInfo and `grpc-retry-pushback-ms` for a
  /// refusal.
  static func check(_ decision: QuotaLimiter.Decision, key: QuotaKey, limit: RateLimit) throws(TollgateError) {
    guard case .refused(let retryAfter, let rate, let burst) = decision else { return }
    let ms = max(1, retryAfter.wholeMilliseconds)
    throw .resourceExhausted(
      "tenant '\(key.tenant)' is over its \(key.quotaClass.rawValue) rate of \(Self.format(limit.ratePerSecond))/s "
        + "(burst \(limit.burst)); retry in \(ms) ms",
      subject: "tenant:\(key.tenant)",
      description:
        "\(key.quotaClass.rawValue) rate \(Self.format(limit.ratePerSecond))/s burst \(limit.burst)"
        + (rate < limit.ratePerSecond ? " (this replica's share: \(Self.format(rate))/s burst \(Self.format(burst)))" : ""),
      retryAfter: retryAfter
    )
  }

  static func format(_ value: Double) -> String {
    value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : String(format: "%.2f", value)
  }
}

/// One call counted against its tenant's concurrency limit until this is released.
final class CallSlot: Sendable {
  let limiter: QuotaLimiter
  let tenant: TenantID

  init(limiter: QuotaLimiter, tenant: TenantID) {
    self.limiter = limiter
    self.tenant = tenant
  }

  deinit { limiter.leave(tenant) }
}

/// `base`, with `pace` awaited after each element is received and before it is handed on.
struct PacedSequence<Base: AsyncSequence & Sendable>: AsyncSequence, Sendable where Base.Element: Sendable {
  typealias Element = Base.Element
  let base: Base
  let pace: @Sendable () async throws -> Void

  struct AsyncIterator: AsyncIteratorProtocol {
    var base: Base.AsyncIterator
    let pace: @Sendable () async throws -> Void

    mutating func next() async throws -> Element? {
      guard let element = try await base.next() else { return nil }
      try await pace()
      return element
    }
  }

  func makeAsyncIterator() -> AsyncIterator {
    AsyncIterator(base: base.makeAsyncIterator(), pace: pace)
  }
}
