import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import Synchronization
import TollgateProtos

typealias WorkflowClient = Tollgate_V1_WorkflowService.Client<HTTP2ClientTransport.Posix>

extension ConnectionOptions {
  /// Runs `body` with a WorkflowService client; a gRPC failure prints its status and exits non-zero.
  func withWorkflow<T: Sendable>(_ body: (WorkflowClient, Metadata) async throws -> T) async throws -> T {
    try await withClient { client, metadata in try await body(WorkflowClient(wrapping: client), metadata) }
  }
}

/// "PENDING_APPROVAL" for `.pendingApproval`: the proto enum's name without its prefix.
func stateName(_ state: Tollgate_V1_RunState) -> String {
  switch state {
  case .pendingApproval: return "PENDING_APPROVAL"
  case .queued: return "QUEUED"
  case .running: return "RUNNING"
  case .succeeded: return "SUCCEEDED"
  case .failed: return "FAILED"
  case .dead: return "DEAD"
  case .cancelled: return "CANCELLED"
  case .rejected: return "REJECTED"
  case .unspecified, .UNRECOGNIZED: return "-"
  }
}

struct Runs: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Dispatch, inspect, steer and watch workflow runs.",
    subcommands: [Dispatch.self, Get.self, List.self, Cancel.self, Approve.self, Reject.self, Watch.self]
  )

  struct Dispatch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Dispatch a run; prints it as JSON. Re-running with the same --key returns the same run."
    )
    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "Task type, e.g. invoice-export") var type: String
    @Option(help: "Payload text") var payload: String?
    @Option(help: "Read the payload from a file ('-' for stdin)") var payloadFile: String?
    @Option(help: "Idempotency key: the same key returns the same run") var key: String = ""
    @Option(help: "Priority, -100 to 100 (higher first)") var priority: Int32 = 0
    @Option(help: "Do not start before this ISO 8601 time") var runAfter: String?
    @Option(help: "Attempts allowed, 1 to 100 (default 3)") var maxAttempts: UInt32 = 0
    @Option(help: "Require approval by this role or group before the run may start") var approver: String?
    @Option(help: "Why approval is needed, shown to the approver") var approvalReason: String = ""

    func run() async throws {
      if payload != nil && payloadFile != nil { throw ValidationError("give --payload or --payload-file, not both") }
      var bytes = Data((payload ?? "").utf8)
      if let payloadFile {
        if payloadFile == "-" {
          bytes = FileHandle.standardInput.readDataToEndOfFile()
        } else {
          guard let data = FileManager.default.contents(atPath: payloadFile) else { throw ValidationError("cannot read \(payloadFile)") }
          bytes = data
        }
      }
      let after = try runAfter.map { try parseTime($0, "--run-after") }
      let response = try await connection.withWorkflow { workflow, metadata in
        try await workflow.dispatch(.with {
          $0.type = type
          $0.payload = bytes
          $0.idempotencyKey = key
          $0.priority = priority
          $0.maxAttempts = maxAttempts
          if let after { $0.runAfter = Google_Protobuf_Timestamp(date: after) }
          if let approver {
            $0.approval = .with {
              $0.requiredApprover = approver
              $0.reason = approvalReason
            }
          }
        }, metadata: metadata)
      }
      if !response.created { FileHandle.standardError.write(Data("tollctl: the key names an existing run; nothing new was dispatched\n".utf8)) }
      try printJSON(response.run)
    }
  }

  struct Get: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print one run as JSON.")
    @OptionGroup var connection: ConnectionOptions
    @Argument var runID: String

    func run() async throws {
      let response = try await connection.withWorkflow { workflow, metadata in
        try await workflow.getRun(.with { $0.runID = runID }, metadata: metadata)
      }
      try printJSON(response.run)
    }
  }

  struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List runs, newest first.")
    @OptionGroup var connection: ConnectionOptions
    @Option(name: .customLong("state"), help: "Only this state, e.g. queued or DEAD (repeatable)") var states: [String] = []
    @Option(help: "Only this task type") var type: String = ""
    @Option(help: "Most runs to list (follows pages)") var limit: Int = 100
    @Flag(help: "Print the runs as JSON") var json = false

    func run() async throws {
      var wanted: [Tollgate_V1_RunState] = []
      for text in states {
        let name = text.uppercased()
        guard let state = Tollgate_V1_RunState.allCases.first(where: { stateName($0) == name }), state != .unspecified else {
          throw ValidationError("--state '\(text)': expected one of pending_approval, queued, running, succeeded, failed, dead, cancelled, rejected")
        }
        wanted.append(state)
      }
      guard limit > 0 else { throw ValidationError("--limit must be at least 1") }
      let runs = try await connection.withWorkflow { workflow, metadata in
        var runs: [Tollgate_V1_Run] = []
        var token = ""
        repeat {
          let page = try await workflow.listRuns(.with {
            $0.states = wanted
            $0.type = type
            $0.pageSize = Int32(min(1000, limit - runs.count))
            $0.pageToken = token
          }, metadata: metadata)
          runs += page.runs
          token = page.nextPageToken
        } while !token.isEmpty && runs.count < limit
        return runs
      }
      if json {
        try printJSON(Tollgate_V1_ListRunsResponse.with { $0.runs = runs })
        return
      }
      let formatter = ISO8601DateFormatter()
      print("RUN ID                                TYPE                  STATE             ATTEMPT  PRIORITY  CREATED")
      for run in runs {
        let columns = [
          run.runID.padding(toLength: 38, withPad: " ", startingAt: 0),
          run.type.padding(toLength: 22, withPad: " ", startingAt: 0),
          stateName(run.state).padding(toLength: 18, withPad: " ", startingAt: 0),
          "\(run.attempt)/\(run.maxAttempts)".padding(toLength: 9, withPad: " ", startingAt: 0),
          String(run.priority).padding(toLength: 10, withPad: " ", startingAt: 0),
          formatter.string(from: run.createTime.date),
        ]
        print(columns.joined())
      }
    }
  }

  struct Cancel: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Cancel a run that has not finished; a running worker is told to stop.")
    @OptionGroup var connection: ConnectionOptions
    @Argument var runID: String
    @Option(help: "Why (recorded)") var reason: String = ""

    func run() async throws {
      let response = try await connection.withWorkflow { workflow, metadata in
        try await workflow.cancelRun(.with { $0.runID = runID; $0.reason = reason }, metadata: metadata)
      }
      try printJSON(response.run)
    }
  }

  /// What Approve and Reject both take.
  struct Decision: ParsableArguments {
    @OptionGroup var connection: ConnectionOptions
    @Argument var runID: String
    @Option(help: "The deciding person's id (audited)") var approver: String
    @Option(help: "Comment (audited)") var comment: String = ""

    func decide(approve: Bool) async throws {
      let run = try await connection.withWorkflow { workflow, metadata in
        approve
          ? try await workflow.approve(.with { $0.runID = runID; $0.approverID = approver; $0.comment = comment }, metadata: metadata).run
          : try await workflow.reject(.with { $0.runID = runID; $0.approverID = approver; $0.comment = comment }, metadata: metadata).run
      }
      try printJSON(run)
    }
  }

  struct Approve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Approve a PENDING_APPROVAL run; it becomes QUEUED.")
    @OptionGroup var decision: Decision
    func run() async throws { try await decision.decide(approve: true) }
  }

  struct Reject: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Reject a PENDING_APPROVAL run; it becomes REJECTED.")
    @OptionGroup var decision: Decision
    func run() async throws { try await decision.decide(approve: false) }
  }

  struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Print every state change of a run until it finishes.",
      discussion: """
        When the gateway goes away before the run finishes (a restart, a deploy's drain, a lost
        connection) it says so on stderr, reconnects with a growing pause (up to 5 s) and goes on
        after the last change it printed. Exit status: 0 when the run SUCCEEDED, 1 when it ended
        DEAD, CANCELLED or REJECTED, 2 when the gateway refused the watch.
        """
    )
    @OptionGroup var connection: ConnectionOptions
    @Argument var runID: String
    @Flag(help: "Print each change as a JSON object on one line") var json = false

    func run() async throws {
      let json = self.json
      // WatchRun replays a run's changes from its dispatch on, so a resumed watch skips as many
      // as it printed.
      let printed = Mutex((count: 0, last: Tollgate_V1_RunState.unspecified))
      var pause = ReconnectPause()
      while true {
        let before = printed.withLock { $0.count }
        do {
          try await connection.withClientOrRPCError { client, metadata in
            try await WorkflowClient(wrapping: client).watchRun(.with { $0.runID = runID }, metadata: metadata) { response in
              let formatter = ISO8601DateFormatter()
              formatter.formatOptions.insert(.withFractionalSeconds)
              var seen = 0
              for try await event in response.messages {
                seen += 1
                guard seen > printed.withLock({ $0.count }) else { continue }
                if json {
                  var options = JSONEncodingOptions()
                  options.preserveProtoFieldNames = true
                  emitLine(try event.jsonString(options: options))
                } else {
                  var line = "\(formatter.string(from: event.time.date))  \(stateName(event.run.state))  attempt \(event.run.attempt)"
                  if !event.run.lastError.isEmpty && event.run.state != .succeeded { line += "  \(event.run.lastError)" }
                  emitLine(line)
                }
                printed.withLock { $0 = (seen, event.run.state) }
              }
            }
          }
          // The stream ends on its own only at a final state.
          if printed.withLock({ $0.last }) != .succeeded { throw ExitCode(1) }
          return
        } catch let error as RPCError {
          printError(error)
          guard ReconnectPause.resumable(error) else { throw ExitCode(2) }
          FileHandle.standardError.write(Data("tollctl: reconnecting, to go on after change \(printed.withLock { $0.count })\n".utf8))
        }
        if printed.withLock({ $0.count }) != before { pause.reset() }
        try await pause.wait()
      }
    }
  }
}

/// One line straight to stdout's descriptor, so a follower's lines appear as they happen.
func emitLine(_ line: String) {
  FileHandle.standardOutput.write(Data((line + "\n").utf8))
}
