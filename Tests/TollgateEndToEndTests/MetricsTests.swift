import Foundation
import GRPCCore
import Testing
import SwiftProtobuf
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateProtos

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// `/metrics` scraped over real HTTP after real calls shows exactly those calls.
@Suite(.timeLimit(.minutes(2))) struct MetricsTests {
  @Test func scrapedCountsMatchTheCallsMade() async throws {
    try await TestGateway.run(configure: { $0.metricsListen = .init(host: "127.0.0.1", port: 0) }) { gw in
      let port = try #require(await gw.gateway.metricsPort())
      try await gw.withClient(try gw.pki.issueOperator()) { client in
        _ = try await Tollgate_V1_TenantService.Client(wrapping: client).createTenant(.with { $0.tenantID = "acme" })
      }
      let partner = try gw.pki.issue(tenant: "acme", role: .partner)
      for _ in 0..<3 {
        _ = try await gw.withClient(partner) { client in
          try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init())
        }
      }
      let agent = try gw.pki.issue(tenant: "acme", role: .agent)
      _ = await statusCode {
        try await gw.withClient(agent) { client in
          try await Tollgate_V1_TenantService.Client(wrapping: client).getTenant(.init())
        }
      }

      let (data, response) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/metrics")!)
      #expect((response as? HTTPURLResponse)?.statusCode == 200)
      let text = String(decoding: data, as: UTF8.self)

      func value(_ name: String, _ labels: [String]) -> Double? {
        let line = text.split(separator: "\n").first { line in
          line.hasPrefix(name + "{") && labels.allSatisfy { line.contains($0) }
        }
        return line.flatMap { $0.split(separator: " ").last }.flatMap { Double($0) }
      }
      let getTenant = [#"grpc_service="tollgate.v1.TenantService""#, #"grpc_method="GetTenant""#, #"grpc_type="unary""#]
      #expect(value("grpc_server_handled_total", getTenant + [#"grpc_code="OK""#]) == 3)
      #expect(value("grpc_server_handled_total", getTenant + [#"grpc_code="PermissionDenied""#]) == 1)
      #expect(value("grpc_server_started_total", getTenant) == 4)
      #expect(value("grpc_server_handling_seconds_count", getTenant) == 4)
      #expect(
        value("grpc_server_handled_total", [#"grpc_method="CreateTenant""#, #"grpc_code="OK""#]) == 1
      )
      #expect(text.contains("tollgate_up 1"))

      // Quota, tenants, database and build metrics from the same calls.
      let acme = [#"tenant="acme""#, #"class="query""#]
      #expect(value("tollgate_quota_admitted_total", acme) == 3)
      #expect(text.contains("tollgate_tenants 1"))
      #expect(text.contains(#"tollgate_build_info{version="\#(TollgateVersion.current)"} 1"#))
      #expect((value("tollgate_db_transaction_duration_seconds_count", [#"outcome="committed""#]) ?? 0) > 0)
      #expect(text.contains("tollgate_audit_buffer_events"))
      #expect(text.contains("tollgate_audit_checkpoint_age_seconds"))

      let (_, missing) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/nope")!)
      #expect((missing as? HTTPURLResponse)?.statusCode == 404)
    }
  }

  @Test func usageCountsAndBoundedTenantLabels() async throws {
    try await TestGateway.run(configure: {
      $0.metricsListen = .init(host: "127.0.0.1", port: 0)
      $0.metricsMaxTenants = 1
    }) { gw in
      let port = try #require(await gw.gateway.metricsPort())
      try await MeteringTests.setUp(gw, tenants: ["acme", "globex"], meters: [MeteringTests.meter("api_calls", .count)])
      for tenant in ["acme", "globex"] {
        try await gw.withClient(try gw.pki.issue(tenant: tenant, role: .agent)) { client in
          let metering = MeteringTests.Metering(wrapping: client)
          _ = try await metering.ingest(MeteringTests.batch(1, ["a", "b", "a"].map { MeteringTests.event($0) }))
          _ = try await metering.ingest(MeteringTests.batch(2, [MeteringTests.event("c", meter: "nope")]))
        }
      }
      let (data, _) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/metrics")!)
      let text = String(decoding: data, as: UTF8.self)
      func value(_ name: String, _ labels: [String]) -> Double? {
        let line = text.split(separator: "\n").first { line in
          line.hasPrefix(name + "{") && labels.allSatisfy { line.contains($0) }
        }
        return line.flatMap { $0.split(separator: " ").last }.flatMap { Double($0) }
      }
      // The first tenant seen has its own label; the second shares "other".
      for tenant in ["acme", "other"] {
        let t = "tenant=\"\(tenant)\""
        #expect(value("tollgate_usage_events_total", [t, #"result="accepted""#]) == 2, "\(tenant)")
        #expect(value("tollgate_usage_events_total", [t, #"result="duplicate""#]) == 1, "\(tenant)")
        #expect(value("tollgate_usage_events_total", [t, #"result="rejected""#]) == 1, "\(tenant)")
      }
      #expect(!text.contains(#"tenant="globex""#))
    }
  }

  @Test func connectedWorkerStreamsAreCounted() async throws {
    try await TestGateway.run(configure: { $0.metricsListen = .init(host: "127.0.0.1", port: 0) }) { gw in
      let port = try #require(await gw.gateway.metricsPort())
      func connected() async throws -> Double? {
        let (data, _) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/metrics")!)
        let line = String(decoding: data, as: UTF8.self).split(separator: "\n").first {
          $0.hasPrefix("tollgate_workflow_workers_connected{") && $0.contains(#"tenant="acme""#)
        }
        return line.flatMap { $0.split(separator: " ").last }.flatMap { Double($0) }
      }
      try await WorkflowTests.createTenants(gw, ["acme"])
      try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .partner)) { client async throws in
        let run = try await WorkflowTests.dispatch(WorkflowTests.Workflow(wrapping: client), payload: "counted")
        try await gw.withClient(try gw.pki.issue(tenant: "acme", role: .worker)) { workerClient async throws in
          try await TestWorker.withWorkers([(workerClient, ["export"], 1), (workerClient, ["report"], 1)]) { workers, inbox in
            // A task pushed on a stream shows that stream is being served.
            let (_, message) = try await inbox.next()
            #expect(message.task.runID == run.runID)
            #expect(try await QuotaTests.eventually { try await connected() == 2 })
          }
        }
      }
      // Both streams have ended once the calls have returned.
      #expect(try await connected() == 0)
    }
  }
}
