import ArgumentParser
import Foundation
import GRPCCore
import Logging
import TollgateAudit
import TollgateCertificates
import TollgateCore
import TollgateGateway
import TollgateModel
import TollgateProtos
import TollgateStore

/// What the audit interceptor costs one call, measured in process: the interceptor around a
/// handler that answers at once, called back to back by a few tasks, beside an interceptor that
/// only passes the call on, in alternating rounds. No network, TLS or HTTP/2, so the difference
/// is not lost in their noise; the events go through the gateway's own buffer into PostgreSQL, and
/// each audited round waits for them to commit, so the machine time counts their append too.
struct AuditCostBench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "audit-cost",
    abstract: "In-process cost per call of the audit interceptor, against a pass-through interceptor."
  )
  @Option(help: "URL the gateway connects with") var databaseURL: String
  @Option(help: "Calls per round") var calls: Int = 50_000
  @Option(help: "Rounds of each arm, alternating") var rounds: Int = 6
  @Option(help: "Concurrent callers") var concurrency: Int = 4
  @Option(help: "JSON results file") var out: String = "bench-results/audit-cost.json"

  struct PassThrough: ServerInterceptor {
    func intercept<Input: Sendable, Output: Sendable>(
      request: StreamingServerRequest<Input>,
      context: ServerContext,
      next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) async throws -> StreamingServerResponse<Output> {
      try await next(request, context)
    }
  }

  struct Discard<Element: Sendable>: RPCWriterProtocol {
    func write(_ element: Element) async throws {}
    func write(contentsOf elements: some Sequence<Element>) async throws {}
  }

  struct Result: Codable {
    var machine: Int
    var callsPerRound: Int
    var concurrency: Int
    var passThroughProcessMicrosPerCall: [Double] = []
    var auditProcessMicrosPerCall: [Double] = []
    var passThroughMachineMicrosPerCall: [Double] = []
    var auditMachineMicrosPerCall: [Double] = []
  }

  func run() async throws {
    var setup = try BenchSetup(databaseURL: databaseURL)
    setup.config.databaseMaxConnections = 4
    // Calls here outrun any flush; the buffer's admission limit is not what is measured.
    setup.config.auditBufferCapacity = 10_000_000
    let gateway = try Gateway(config: setup.config, logger: benchLogger)
    let tenant = try TenantID(validating: "bench-cost")
    let scope = CallScope(
      principal: Principal(
        spiffeID: SPIFFEID(tenant: tenant, role: .partner, name: "bench", trustDomain: setup.ca.trustDomain),
        certificateSHA256: String(repeating: "ab", count: 32),
        serialHex: "1f"
      ),
      tenant: tenant,
      impersonated: false
    )
    let audit = AuditInterceptor(
      policy: .standard,
      buffer: gateway.auditBuffer,
      repository: AuditLogRepository(database: gateway.database),
      logger: benchLogger
    )
    var result = Result(machine: ProcessInfo.processInfo.activeProcessorCount, callsPerRound: calls, concurrency: concurrency)
    try await withRunningGateway(gateway) { _ in
      // Warm-up of both arms, not counted.
      _ = try await round(PassThrough(), scope: scope, calls: calls / 5)
      _ = try await round(audit, scope: scope, calls: calls / 5)
      await gateway.auditBuffer.allCommitted()
      for index in 0..<rounds {
        // ABBA, so a drift of the host's speed within the run falls on both arms alike.
        let auditFirst = index % 2 == 1
        for isAudit in auditFirst ? [true, false] : [false, true] {
          let busy = MachineCPU.busySeconds()
          let process = MachineCPU.processSeconds()
          if isAudit {
            try await round(audit, scope: scope, calls: calls)
            await gateway.auditBuffer.allCommitted()
          } else {
            try await round(PassThrough(), scope: scope, calls: calls)
          }
          let processMicros = (MachineCPU.processSeconds() - process) * 1e6 / Double(calls)
          let machineMicros = (MachineCPU.busySeconds() - busy) * 1e6 / Double(calls)
          if isAudit {
            result.auditProcessMicrosPerCall.append(processMicros)
            result.auditMachineMicrosPerCall.append(machineMicros)
          } else {
            result.passThroughProcessMicrosPerCall.append(processMicros)
            result.passThroughMachineMicrosPerCall.append(machineMicros)
          }
        }
      }
    }
    let process = median(result.auditProcessMicrosPerCall) - median(result.passThroughProcessMicrosPerCall)
    let machine = median(result.auditMachineMicrosPerCall) - median(result.passThroughMachineMicrosPerCall)
    print(
      String(
        format: "audit interceptor, in process (%d cores, %d callers, %d rounds of %d calls): pass-through %.2f / %.2f µs, audited %.2f / %.2f µs per call (process / machine); auditing adds %.2f µs process, %.2f µs machine",
        result.machine, concurrency, rounds, calls,
        median(result.passThroughProcessMicrosPerCall), median(result.passThroughMachineMicrosPerCall),
        median(result.auditProcessMicrosPerCall), median(result.auditMachineMicrosPerCall),
        process, machine
      )
    )
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    try FileManager.default.createDirectory(
      at: URL(fileURLWithPath: out).deletingLastPathComponent(), withIntermediateDirectories: true)
    try encoder.encode(result).write(to: URL(fileURLWithPath: out))
  }

  /// `calls` GetTenant calls through `interceptor` and a handler that answers at once, by
  /// `concurrency` tasks, each call in the caller's scope as the identity interceptor sets it.
  @discardableResult
  func round(_ interceptor: some ServerInterceptor, scope: CallScope, calls: Int) async throws -> Int {
    let descriptor = Tollgate_V1_TenantService.Method.GetTenant.descriptor
    let perTask = calls / concurrency
    try await withThrowingTaskGroup(of: Void.self) { group in
      for _ in 0..<concurrency {
        group.addTask {
          try await withServerContextRPCCancellationHandle { cancellation in
            let context = ServerContext(
              descriptor: descriptor, remotePeer: "ipv4:127.0.0.1:1", localPeer: "ipv4:127.0.0.1:2",
              cancellation: cancellation)
            var request = Tollgate_V1_GetTenantRequest()
            request.tenantID = scope.tenant?.rawValue ?? ""
            for _ in 0..<perTask {
              try await CallScope.$current.withValue(scope) {
                let response: StreamingServerResponse<Tollgate_V1_Tenant> = try await interceptor.intercept(
                  request: StreamingServerRequest(single: ServerRequest(metadata: [:], message: request)),
                  context: context
                ) { request, _ in
                  for try await _ in request.messages {}
                  var tenant = Tollgate_V1_Tenant()
                  tenant.tenantID = "bench-cost"
                  return StreamingServerResponse(single: ServerResponse(message: tenant))
                }
                let contents = try response.accepted.get()
                _ = try await contents.producer(RPCWriter(wrapping: Discard<Tollgate_V1_Tenant>()))
              }
            }
          }
        }
      }
      try await group.waitForAll()
    }
    return perTask * concurrency
  }
}
