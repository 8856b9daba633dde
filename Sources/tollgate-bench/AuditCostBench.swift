import ArgumentParser
import Foundation
import GRPCCore
import Logging
import PostgresNIO
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
/// is not lost in their noise. The audited calls' events wait in a buffer until the round ends;
/// then the buffer appends them to PostgreSQL, and that flush is measured on its own, machine time
/// (PostgreSQL's) included.
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

  func validate() throws {
    // Each caller makes calls / concurrency of them; per-call figures divide by `calls`.
    guard concurrency >= 1, calls >= concurrency, calls % concurrency == 0 else {
      throw ValidationError("--calls must be a positive multiple of --concurrency")
    }
  }

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
    var cores: Int
    var callsPerRound: Int
    var concurrency: Int
    var passThrough: [Cost] = []
    var auditCalls: [Cost] = []
    var auditFlush: [Cost] = []
    /// For scale, per operation: one statement on a pooled connection, and a platform
    /// transaction around one statement (what a flush pays besides its own statements).
    var statement: Cost?
    var transaction: Cost?
  }

  func run() async throws {
    let setup = try BenchSetup(databaseURL: databaseURL)
    defer { try? FileManager.default.removeItem(at: setup.directory) }
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
    let repository = AuditLogRepository(database: gateway.database)
    var result = Result(cores: ProcessInfo.processInfo.activeProcessorCount, callsPerRound: calls, concurrency: concurrency)
    try await withRunningGateway(gateway) { _ in
      // Warm-up of both arms, not counted.
      try await round(PassThrough(), scope: scope, calls: calls / 5)
      _ = try await auditedRound(repository, scope: scope, calls: calls / 5)
      for index in 0..<rounds {
        // ABBA, so a drift of the host's speed within the run falls on both arms alike.
        let auditFirst = index % 2 == 1
        for isAudit in auditFirst ? [true, false] : [false, true] {
          if isAudit {
            let (calls, flush) = try await auditedRound(repository, scope: scope, calls: calls)
            result.auditCalls.append(calls)
            result.auditFlush.append(flush)
          } else {
            let cost = try await Cost.of(calls: calls) { try await round(PassThrough(), scope: scope, calls: calls) }
            result.passThrough.append(cost)
          }
        }
      }
      (result.statement, result.transaction) = try await databaseFixedCosts(gateway.database)
    }
    let passThrough = Cost.mean(result.passThrough)
    let audited = Cost.mean(result.auditCalls)
    let flush = Cost.mean(result.auditFlush)
    print(
      String(
        format: """
          audit interceptor in process (%d cores, %d callers, %d rounds of %d calls), µs per call, process / machine:
            pass-through call %.2f / %.2f; audited call %.2f / %.2f; its event's flush %.2f / %.2f
            auditing adds %.2f / %.2f (on the call's path %.2f / %.2f)
          """,
        result.cores, concurrency, rounds, calls,
        passThrough.process, passThrough.machine, audited.process, audited.machine, flush.process, flush.machine,
        audited.process + flush.process - passThrough.process, audited.machine + flush.machine - passThrough.machine,
        audited.process - passThrough.process, audited.machine - passThrough.machine
      )
    )
    if let statement = result.statement, let transaction = result.transaction {
      print(
        String(
          format: """
              for scale, per operation, µs process / machine and context switches: a statement on a pooled \
            connection %.1f / %.1f, %.1f; a platform transaction of one statement %.1f / %.1f, %.1f
            """,
          statement.process, statement.machine, statement.switches, transaction.process, transaction.machine, transaction.switches
        )
      )
    }
    try writeResults(result, to: out)
  }

  /// CPU time per call: of this process, and of the whole machine (PostgreSQL's included).
  struct Cost: Codable {
    var process: Double
    var machine: Double
    /// The machine's context switches.
    var switches: Double = 0

    static func of(calls: Int, _ body: () async throws -> Void) async throws -> Cost {
      let before = CPUTime.now()
      try await body()
      let used = CPUTime.now() - before
      return Cost(
        process: used.processSeconds * 1e6 / Double(calls),
        machine: used.machineSeconds * 1e6 / Double(calls),
        switches: used.contextSwitches / Double(calls)
      )
    }

    /// The mean over rounds of equal size: the machine's busy time comes in ticks of 10 ms, which
    /// a median of short rounds would round away.
    static func mean(_ costs: [Cost]) -> Cost {
      let count = Double(max(costs.count, 1))
      return Cost(
        process: costs.map(\.process).reduce(0, +) / count,
        machine: costs.map(\.machine).reduce(0, +) / count,
        switches: costs.map(\.switches).reduce(0, +) / count
      )
    }
  }

  /// What the database costs per operation whatever the operation does, one at a time: a
  /// statement that does nothing (`SELECT 1`) on a leased pooled connection, and the same inside
  /// a platform transaction (BEGIN, the role, the statement, COMMIT), as every flush runs.
  func databaseFixedCosts(_ database: Database) async throws -> (statement: Cost, transaction: Cost) {
    let operations = 2_000
    func statement() async throws {
      try await database.client.withConnection { connection in
        _ = try await connection.prepared("SELECT 1", logger: benchLogger)
      }
    }
    func transaction() async throws {
      try await database.withPlatform(logger: benchLogger) { connection in
        _ = try await connection.prepared("SELECT 1", logger: benchLogger)
      }
    }
    for _ in 0..<200 {
      try await statement()
      try await transaction()
    }
    let statementCost = try await Cost.of(calls: operations) { for _ in 0..<operations { try await statement() } }
    let transactionCost = try await Cost.of(calls: operations) { for _ in 0..<operations { try await transaction() } }
    return (statementCost, transactionCost)
  }

  /// A round of audited calls whose events wait in a buffer that is not flushing, then that
  /// buffer's flush on its own: what a call costs on its path, and what its event costs later.
  func auditedRound(_ repository: AuditLogRepository, scope: CallScope, calls: Int) async throws -> (calls: Cost, flush: Cost) {
    let buffer = AuditBuffer(capacity: .max, repository: repository, logger: benchLogger, linger: .zero)
    let audit = AuditInterceptor(policy: .standard, buffer: buffer, repository: repository, tenantExists: { _ in true }, logger: benchLogger)
    let callCost = try await Cost.of(calls: calls) { try await round(audit, scope: scope, calls: calls) }
    let flushCost = try await Cost.of(calls: calls) {
      let flusher = Task { try await buffer.run() }
      await buffer.allCommitted()
      flusher.cancel()
      try await flusher.value
    }
    return (callCost, flushCost)
  }

  /// `calls` GetTenant calls through `interceptor` and a handler that answers at once, by
  /// `concurrency` tasks, each call in the caller's scope as the identity interceptor sets it.
  func round(_ interceptor: some ServerInterceptor, scope: CallScope, calls: Int) async throws {
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
  }
}
