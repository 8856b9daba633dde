public import CoreMetrics
import Synchronization
public import TollgateModel

/// Where every layer records its metrics (swift-metrics, so no layer below the gateway knows the
/// metrics are Prometheus), with tenant labels kept bounded: the first `maxTenantLabels` tenants
/// seen get their own label value, every later one shares `other`, so a fleet of many tenants
/// cannot blow up the number of series.
public struct Telemetry: Sendable {
  public let factory: any MetricsFactory
  private let tenants: TenantLabels

  public init(factory: any MetricsFactory, maxTenantLabels: Int) {
    self.factory = factory
    self.tenants = TenantLabels(maximum: maxTenantLabels)
  }

  /// Records nothing: for tools and tests that do not scrape.
  public static let disabled = Telemetry(factory: NOOPMetricsHandler.instance, maxTenantLabels: 0)

  /// The `tenant` label value for `tenant`.
  public func tenantLabel(_ tenant: TenantID) -> String { tenants.label(tenant) }

  /// Adds `amount` to a counter.
  public func count(_ name: String, _ dimensions: [(String, String)] = [], by amount: Int = 1) {
    guard amount > 0 else { return }
    Counter(label: name, dimensions: dimensions, factory: factory).increment(by: amount)
  }

  /// Moves a gauge of things currently open or in use up or down.
  public func adjust(_ name: String, _ dimensions: [(String, String)] = [], by delta: Double) {
    let meter = Meter(label: name, dimensions: dimensions, factory: factory)
    if delta >= 0 { meter.increment(by: delta) } else { meter.decrement(by: -delta) }
  }

  /// Sets a gauge.
  public func set(_ name: String, _ dimensions: [(String, String)] = [], _ value: Double) {
    Gauge(label: name, dimensions: dimensions, factory: factory).record(value)
  }

  /// Records a duration in a histogram (seconds, in Prometheus).
  public func record(_ name: String, _ dimensions: [(String, String)] = [], _ duration: Duration) {
    let (seconds, attoseconds) = duration.components
    CoreMetrics.Timer(label: name, dimensions: dimensions, factory: factory)
      .recordNanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
  }
}

final class TenantLabels: Sendable {
  static let overflow = "other"
  let maximum: Int
  private let seen = Mutex<Set<TenantID>>([])

  init(maximum: Int) { self.maximum = maximum }

  func label(_ tenant: TenantID) -> String {
    seen.withLock { seen in
      if seen.contains(tenant) { return tenant.rawValue }
      guard seen.count < maximum else { return Self.overflow }
      seen.insert(tenant)
      return tenant.rawValue
    }
  }
}
