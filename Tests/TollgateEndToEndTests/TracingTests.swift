import Foundation
import GRPCCore
import Logging
import Synchronization
import Testing
import Tracing
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateProtos

/// The caller's W3C trace context reaches the call's server span and the database spans under it.
@Suite(.timeLimit(.minutes(2))) struct TracingTests {
  /// Span log lines of every gateway in this test process, through the tracer `tollgate serve`
  /// bootstraps. Bootstrapping is once per process, so it is shared.
  final class Capture: Sendable {
    let lines = Mutex<[String]>([])
    nonisolated(unsafe) static let shared: Capture = {
      let capture = Capture()
      var logger = Logger(label: "spans") { label in
        JSONLogHandler(label: label, output: .init { bytes in
          let line = String(decoding: bytes, as: UTF8.self)
          capture.lines.withLock { $0.append(line) }
        })
      }
      logger.logLevel = .debug
      InstrumentationSystem.bootstrap(LogTracer(logger: logger))
      return capture
    }()

    func spans(trace: String) -> [[String: Any]] {
      lines.withLock { $0 }.filter { $0.contains(trace) }.compactMap {
        try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
      }.filter { $0["trace_id"] as? String == trace }
    }
  }

  @Test func aCallersTraceParentIsTheParentOfTheServerSpanAndItsDatabaseSpans() async throws {
    let capture = Capture.shared
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    let callerSpan = "00f067aa0ba902b7"
    try await TestGateway.run { gw in
      try await QuotaTests.setQuota(gw, tenant: "acme", [])
      var metadata: Metadata = [:]
      metadata.addString("00-\(trace)-\(callerSpan)-01", forKey: "traceparent")
      _ = try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client in
        try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init(), metadata: metadata)
      }
      #expect(try await QuotaTests.eventually { capture.spans(trace: trace).count >= 2 })
      let spans = capture.spans(trace: trace)
      let server = try #require(spans.first { $0["name"] as? String == "tollgate.v1.TenantService/GetTenant" })
      #expect(server["parent_span_id"] as? String == callerSpan)
      #expect(server["kind"] as? String == "server")
      let database = spans.filter { $0["name"] as? String == "db.transaction" }
      #expect(!database.isEmpty)
      #expect(database.allSatisfy { $0["parent_span_id"] as? String == server["span_id"] as? String })
      // Without a traceparent a call starts a trace of its own.
      _ = try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client in
        try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init())
      }
      #expect(capture.spans(trace: trace).count == spans.count)
    }
  }
}
