import ArgumentParser
import Foundation
import GRPCCore
import Synchronization
import SwiftProtobuf
import TollgateProtos

struct Worker: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Run workflow tasks by piping each task's payload to a shell command.",
    discussion: """
      Holds one Connect stream. Each task runs `sh -c CMD` with the payload on stdin and
      TOLLGATE_RUN_ID, TOLLGATE_TASK_TYPE, TOLLGATE_ATTEMPT and TOLLGATE_LEASE_ID in the
      environment. Exit status 0 completes the run with the command's stdout as its result; the
      --fatal-exit-code status fails it for good; any other status fails the attempt, which is
      retried with backoff while attempts remain (the last lines of stderr become the run's
      error). Leases are heartbeated while commands run; a cancelled run's command gets SIGTERM.
      """
  )
  @OptionGroup var connection: ConnectionOptions
  @Option(name: .customLong("type"), help: "Task type to run (repeatable)") var types: [String]
  @Option(help: "Tasks run at once, 1 to 256") var capacity: UInt32 = 1
  @Option(help: "Shell command run per task") var exec: String
  @Option(help: "Name shown in logs and audit") var name: String = ProcessInfo.processInfo.hostName
  @Option(help: "Exit status that fails a run without retrying") var fatalExitCode: Int32 = 65
  @Option(help: "Stop after this many tasks have finished (0: run until interrupted)") var maxTasks: Int = 0

  func validate() throws {
    guard !types.isEmpty else { throw ValidationError("name at least one --type") }
    guard (1...256).contains(capacity) else { throw ValidationError("--capacity must be 1 to 256") }
    guard maxTasks >= 0 else { throw ValidationError("--max-tasks must be 0 or more") }
  }

  func run() async throws {
    let (outbound, send) = AsyncStream.makeStream(of: Tollgate_V1_WorkerMessage.self)
    send.yield(.with {
      $0.hello = .with {
        $0.taskTypes = types
        $0.capacity = capacity
        $0.workerName = name
      }
    })
    let command = exec
    let fatal = fatalExitCode
    let maxTasks = maxTasks
    let state = WorkerTracker()
    try await connection.withWorkflow(longLived: true) { workflow, metadata in
      try await workflow.connect(
        metadata: metadata,
        requestProducer: { writer in
          for await message in outbound { try await writer.write(message) }
        },
        onResponse: { response in
          try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
              // Heartbeats for every held lease, three per lease timeout.
              while true {
                let interval = state.state.withLock { $0.heartbeatInterval }
                try await Task.sleep(for: interval)
                if state.state.withLock({ !$0.running.isEmpty }) { send.yield(.with { $0.heartbeat = .init() }) }
              }
            }
            for try await message in response.messages {
              switch message.kind {
              case .task(let task):
                let timeout = Duration.seconds(task.leaseTimeout.seconds) + .nanoseconds(Int64(task.leaseTimeout.nanos))
                let run = TaskProcess(command: command, task: task)
                state.state.withLock {
                  $0.running[task.leaseID] = run
                  if timeout > .zero { $0.heartbeatInterval = timeout / 3 }
                }
                group.addTask {
                  let outcome = await run.run()
                  let revoked = state.state.withLock { $0.running.removeValue(forKey: task.leaseID) == nil }
                  if revoked { return }
                  if outcome.status == 0 {
                    send.yield(.with { $0.completed = .with { $0.leaseID = task.leaseID; $0.result = outcome.stdout } })
                  } else {
                    send.yield(.with {
                      $0.failed = .with {
                        $0.leaseID = task.leaseID
                        $0.error = outcome.error
                        $0.retryable = outcome.status != fatal
                      }
                    })
                  }
                  emitLine("run \(task.runID) attempt \(task.attempt): \(outcome.status == 0 ? "completed" : "failed (exit \(outcome.status))")")
                }
              case .revoked(let revoked):
                let process = state.state.withLock { $0.running.removeValue(forKey: revoked.leaseID) }
                process?.terminate()
                emitLine("lease \(revoked.leaseID) revoked: \(revoked.reason)")
              case .ack(let ack):
                if !ack.accepted { FileHandle.standardError.write(Data("tollctl: result not recorded: \(ack.message)\n".utf8)) }
                let finished = state.state.withLock { s -> Int in
                  s.finished += 1
                  return s.finished
                }
                if maxTasks > 0 && finished >= maxTasks { send.finish() }
              case nil:
                continue
              }
            }
            group.cancelAll()
          }
        }
      )
    }
  }
}

final class WorkerTracker: Sendable {
  let state = Mutex(WorkerState())
}

struct WorkerState {
  var running: [String: TaskProcess] = [:]
  var heartbeatInterval: Duration = .seconds(10)
  var finished = 0
}

/// One task's `sh -c` process.
final class TaskProcess: Sendable {
  let process: Process
  let task: Tollgate_V1_TaskAssignment
  let command: String

  init(command: String, task: Tollgate_V1_TaskAssignment) {
    self.command = command
    self.task = task
    self.process = Process()
  }

  struct Outcome {
    var status: Int32
    var stdout: Data
    var error: String
  }

  func terminate() {
    if process.isRunning { process.terminate() }
  }

  func run() async -> Outcome {
    process.executableURL = URL(fileURLWithPath: "/bin/sh")
    process.arguments = ["-c", command]
    var environment = ProcessInfo.processInfo.environment
    environment["TOLLGATE_RUN_ID"] = task.runID
    environment["TOLLGATE_TASK_TYPE"] = task.type
    environment["TOLLGATE_ATTEMPT"] = String(task.attempt)
    environment["TOLLGATE_LEASE_ID"] = task.leaseID
    process.environment = environment
    let input = Pipe()
    let output = Pipe()
    let errors = Pipe()
    process.standardInput = input
    process.standardOutput = output
    process.standardError = errors
    do {
      try process.run()
    } catch {
      return Outcome(status: 127, stdout: Data(), error: "could not start sh: \(error)")
    }
    let payload = task.payload
    // Pipes are drained on their own threads, so a command that writes a lot before reading its
    // input (or the other way round) cannot deadlock with us.
    async let written: Void = Self.blocking {
      try? input.fileHandleForWriting.write(contentsOf: payload)
      try? input.fileHandleForWriting.close()
    }
    async let stdout = Self.blocking { output.fileHandleForReading.readDataToEndOfFile() }
    async let stderr = Self.blocking { errors.fileHandleForReading.readDataToEndOfFile() }
    let (_, out, err) = await (written, stdout, stderr)
    await Self.blocking { [process] in process.waitUntilExit() }
    let tail = String(decoding: err, as: UTF8.self).split(separator: "\n").suffix(5).joined(separator: "\n")
    let status = process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
    return Outcome(status: status, stdout: out, error: tail.isEmpty ? "exit status \(status)" : tail)
  }

  static func blocking<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
      DispatchQueue.global().async { continuation.resume(returning: work()) }
    }
  }
}
