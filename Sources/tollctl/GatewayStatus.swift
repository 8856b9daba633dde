import ArgumentParser
import Foundation
import TollgateModel

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// `tollctl status`: one screen on a running gateway, read from its Prometheus endpoint twice,
/// `--interval` apart, so rates are rates over that interval.
struct StatusCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "status",
    abstract: "One-screen summary of a gateway: version, uptime, tenants, calls/s, errors, audit lag, queue depth."
  )

  @Option(help: "The gateway's metrics URL (its --metrics-listen). Env: TOLLCTL_METRICS (default http://127.0.0.1:9090/metrics)")
  var metrics: String?
  @Option(help: "Seconds between the two scrapes that rates are computed from") var interval: Double = 2
  @Flag(help: "Print JSON instead of text") var json = false

  func run() async throws {
    let address = metrics ?? ProcessInfo.processInfo.environment["TOLLCTL_METRICS"] ?? "http://127.0.0.1:9090/metrics"
    guard let url = URL(string: address), url.scheme == "http" || url.scheme == "https" else {
      throw ValidationError("--metrics is '\(address)'; expected a URL such as http://127.0.0.1:9090/metrics")
    }
    guard interval > 0, interval <= 60 else { throw ValidationError("--interval must be between 0 and 60 seconds") }
    let first = try await Self.scrape(url)
    try await Task.sleep(for: .milliseconds(Int(interval * 1000)))
    let second = try await Self.scrape(url)
    let summary = Summary(first: first, second: second, seconds: interval)
    if json {
      let encoder = JSONEncoder()
      encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
      print(String(decoding: try encoder.encode(summary), as: UTF8.self))
    } else {
      print(summary.text(url: address))
    }
  }

  static func scrape(_ url: URL) async throws -> Samples {
    let data: Data
    let response: URLResponse
    do {
      (data, response) = try await URLSession.shared.data(from: url)
    } catch {
      throw ValidationError("cannot read \(url): \(error.localizedDescription); is the gateway running with --metrics-listen?")
    }
    guard (response as? HTTPURLResponse)?.statusCode == 200 else {
      throw ValidationError("\(url) answered \((response as? HTTPURLResponse)?.statusCode ?? 0), not 200")
    }
    return Samples(parsing: String(decoding: data, as: UTF8.self))
  }
}

/// Samples of the Prometheus text exposition format: name, labels, value.
struct Samples {
  struct Sample {
    var name: String
    var labels: [String: String]
    var value: Double
  }
  var all: [Sample] = []

  init(parsing text: String) {
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
      guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
      let series = line[..<space]
      guard let brace = series.firstIndex(of: "{") else {
        all.append(Sample(name: String(series), labels: [:], value: value))
        continue
      }
      var labels: [String: String] = [:]
      // Label values here never hold `",` (they are method names, codes, tenant ids, states).
      for pair in series[series.index(after: brace)..<series.index(before: series.endIndex)].split(separator: "\",") {
        let parts = pair.split(separator: "=", maxSplits: 1)
        guard parts.count == 2 else { continue }
        labels[String(parts[0]).trimmingCharacters(in: CharacterSet(charactersIn: ","))] =
          String(parts[1]).trimmingCharacters(in: CharacterSet(charactersIn: "\""))
      }
      all.append(Sample(name: String(series[..<brace]), labels: labels, value: value))
    }
  }

  func sum(_ name: String, where match: ([String: String]) -> Bool = { _ in true }) -> Double {
    all.filter { $0.name == name && match($0.labels) }.reduce(0) { $0 + $1.value }
  }

  func values(_ name: String, by label: String) -> [String: Double] {
    var out: [String: Double] = [:]
    for sample in all where sample.name == name {
      out[sample.labels[label] ?? "", default: 0] += sample.value
    }
    return out
  }

  func label(_ name: String, _ label: String) -> String? {
    all.first { $0.name == name }?.labels[label]
  }
}

struct Summary: Codable {
  var version: String
  var uptimeSeconds: Double
  var tenants: Int
  var callsPerSecond: Double
  var errorRate: Double
  var callsInFlight: [String: Double]
  var connections: Double
  var quotaRefusalsPerSecond: Double
  var auditBufferEvents: Double
  var auditAppendLagSeconds: Double
  var auditCheckpointAgeSeconds: Double
  var databaseConnectionsInUse: Double
  var databaseConnectionsWaiting: Double
  var workflowRuns: [String: Double]
  var workersConnected: Double
  var usageEventsPerSecond: [String: Double]

  init(first: Samples, second: Samples, seconds: Double) {
    func rate(_ name: String, where match: @escaping ([String: String]) -> Bool = { _ in true }) -> Double {
      max(0, second.sum(name, where: match) - first.sum(name, where: match)) / seconds
    }
    version = second.label("tollgate_build_info", "version") ?? "unknown"
    uptimeSeconds = Date().timeIntervalSince1970 - second.sum("tollgate_start_time_seconds")
    tenants = Int(second.sum("tollgate_tenants"))
    callsPerSecond = rate("grpc_server_handled_total")
    let errors = rate("grpc_server_handled_total") { $0["grpc_code"] != "OK" }
    errorRate = callsPerSecond > 0 ? errors / callsPerSecond : 0
    callsInFlight = second.values("tollgate_calls_in_flight", by: "grpc_type").filter { $0.value > 0 }
    connections = second.sum("tollgate_connections_open")
    quotaRefusalsPerSecond = rate("tollgate_quota_refused_total")
    auditBufferEvents = second.sum("tollgate_audit_buffer_events")
    auditAppendLagSeconds = second.sum("tollgate_audit_append_lag_seconds")
    auditCheckpointAgeSeconds = second.sum("tollgate_audit_checkpoint_age_seconds")
    databaseConnectionsInUse = second.sum("tollgate_db_connections_in_use")
    databaseConnectionsWaiting = second.sum("tollgate_db_connections_waiting")
    workflowRuns = second.values("tollgate_workflow_runs", by: "state")
    workersConnected = second.sum("tollgate_workflow_workers_connected")
    let firstUsage = first.values("tollgate_usage_events_total", by: "result")
    usageEventsPerSecond = second.values("tollgate_usage_events_total", by: "result").mapValues { $0 / seconds }
      .merging(firstUsage.mapValues { -$0 / seconds }) { $0 + $1 }
  }

  func text(url: String) -> String {
    func f(_ v: Double, _ digits: Int = 1) -> String { String(format: "%.\(digits)f", v) }
    func list(_ d: [String: Double]) -> String {
      d.isEmpty ? "none" : d.sorted { $0.key < $1.key }.map { "\($0.key) \(f($0.value, 0))" }.joined(separator: ", ")
    }
    let up = Int(uptimeSeconds)
    let runs = ["pending_approval", "queued", "running", "succeeded", "failed", "dead", "cancelled", "rejected"]
      .compactMap { state in workflowRuns[state].map { "\(state) \(f($0, 0))" } }
    return """
      Tollgate \(version) at \(url), up \(up / 86_400)d \(up % 86_400 / 3_600)h \(up % 3_600 / 60)m
      tenants           \(tenants)
      calls/s           \(f(callsPerSecond))   errors \(f(errorRate * 100))%   quota refusals/s \(f(quotaRefusalsPerSecond))
      in flight         \(list(callsInFlight))   connections \(f(connections, 0))
      audit             \(f(auditBufferEvents, 0)) events waiting, append lag \(f(auditAppendLagSeconds, 2)) s, checkpoint age \(auditCheckpointAgeSeconds < 0 ? "none yet" : f(auditCheckpointAgeSeconds, 2) + " s")
      database pool     \(f(databaseConnectionsInUse, 0)) in use, \(f(databaseConnectionsWaiting, 0)) waiting
      workflow runs     \(runs.isEmpty ? "none counted yet" : runs.joined(separator: ", "))   workers connected \(f(workersConnected, 0))
      usage events/s    \(list(usageEventsPerSecond.filter { $0.value > 0 }))
      """
  }
}
