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

      When the gateway goes away (a restart, a deploy's drain, a lost connection) the commands
      keep running: the worker says so on stderr, reconnects with a growing pause (up to 5 s),
      takes its leases back on the new stream and sends the results that were not acknowledged.
      A lease that expired meanwhile is revoked and its command stopped. Refusals (a bad
      certificate, a bad --type) end the worker with exit status 2.

      SIGTERM or SIGINT drains: the gateway pushes nothing more, the commands running finish and
      their results are sent, then the worker exits 0. A second signal stops the commands at once
      and exits (their leases expire and the runs are offered again). Only the worker should get
      the first signal: Ctrl-C in a terminal reaches the commands too, and so does systemd's
      default KillMode (use KillMode=mixed).
      """
  )
  @OptionGroup var connection: ConnectionOptions
  @Option(name: .customLong("type"), help: "Task type to run (repeatable)") var types: [String]
  @Option(help: "Tasks run at once, 1 to 256") var capacity: UInt32 = 1
  @Option(help: "Shell command run per task") var exec: String
  @Option(help: "Name shown in logs and audit") var name: String = ProcessInfo.processInfo.hostName
  @Option(help: "Exit status that fails a run without retrying") var fatalExitCode: Int32 = 65
  @Option(help: "Stop after this many tasks have finished (0: run until interrupted); commands still running then are stopped")
  var maxTasks: Int = 0

  func validate() throws {
    guard !types.isEmpty else { throw ValidationError("name at least one --type") }
    guard (1...256).contains(capacity) else { throw ValidationError("--capacity must be 1 to 256") }
    guard maxTasks >= 0 else { throw ValidationError("--max-tasks must be 0 or more") }
  }

  func run() async throws {
    let hello = Tollgate_V1_WorkerHello.with {
      $0.taskTypes = types
      $0.capacity = capacity
      $0.workerName = name
    }
    let tracker = WorkerTracker(hello: hello, command: exec, fatalExitCode: fatalExitCode, maxTasks: maxTasks)
    let signals = Self.onStopSignals { signal, first in
      if first {
        let running = tracker.beginDrain()
        FileHandle.standardError.write(
          Data("tollctl: stopping: taking no more tasks, finishing \(running) running (signal again to stop them now)\n".utf8)
        )
      } else {
        tracker.stopAll()
        FileHandle.standardError.write(Data("tollctl: stopped; the runs of stopped commands are offered again once their leases expire\n".utf8))
        Foundation.exit(128 + signal)
      }
    }
    defer { signals.forEach { $0.cancel() } }
    let (assignments, assign) = AsyncStream.makeStream(of: TaskProcess.self)
    try await withThrowingTaskGroup(of: Void.self) { group in
      // Commands run here, outside any one stream, so they outlive a reconnect.
      group.addTask {
        await withDiscardingTaskGroup { commands in
          for await process in assignments {
            commands.addTask { await tracker.run(process) }
          }
        }
      }
      group.addTask {
        // Heartbeats for every held lease, three per lease timeout.
        while true {
          try await Task.sleep(for: tracker.heartbeatInterval)
          tracker.heartbeat()
        }
      }
      defer {
        assign.finish()
        tracker.stopAll()
        group.cancelAll()
      }
      var pause = ReconnectPause()
      // Done can also come while no stream is open: drained with nothing left to report.
      while !tracker.isDone {
        let began = ContinuousClock.now
        do {
          try await connection.withClientOrRPCError { client, metadata in
            try await Self.connect(WorkflowClient(wrapping: client), metadata: metadata, tracker: tracker, assign: assign)
          }
          tracker.closeStream()
          if tracker.isDone { return }
          FileHandle.standardError.write(Data("tollctl: the gateway ended the worker stream; reconnecting\n".utf8))
        } catch let error as RPCError {
          tracker.closeStream()
          if tracker.isDone { return }
          printError(error)
          guard ReconnectPause.resumable(error) else { throw ExitCode(2) }
          FileHandle.standardError.write(Data("tollctl: reconnecting; \(tracker.runningCount) commands still running\n".utf8))
        }
        // A stream that served a while (or any message) was a working connection: start the
        // pauses over. One refused at once keeps doubling them.
        if tracker.takeHeardFrom() || ContinuousClock.now - began > .seconds(5) { pause.reset() }
        try await pause.wait()
      }
    }
  }

  /// Calls `handler` on each SIGTERM or SIGINT, saying whether it is the first.
  static func onStopSignals(_ handler: @escaping @Sendable (Int32, _ first: Bool) -> Void) -> [any DispatchSourceSignal] {
    let seen = Mutex(false)
    return [SIGTERM, SIGINT].map { number in
      signal(number, SIG_IGN)
      let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
      source.setEventHandler {
        let first = seen.withLock { seen in
          defer { seen = true }
          return !seen
        }
        handler(number, first)
      }
      source.resume()
      return source
    }
  }

  /// One Connect stream, until it ends.
  static func connect(
    _ workflow: WorkflowClient,
    metadata: Metadata,
    tracker: WorkerTracker,
    assign: AsyncStream<TaskProcess>.Continuation
  ) async throws {
    let (outbound, reconnect) = tracker.openStream()
    try await workflow.connect(
      metadata: metadata,
      requestProducer: { writer in
        for await message in outbound { try await writer.write(message) }
      },
      onResponse: { response in
        if let reconnect, case .success = response.accepted {
          FileHandle.standardError.write(
            Data("tollctl: connected again; taking back \(reconnect.held) leases, sending \(reconnect.results) results\n".utf8)
          )
        }
        for try await message in response.messages {
          tracker.heard()
          switch message.kind {
          case .task(let task):
            assign.yield(tracker.start(task))
          case .revoked(let revoked):
            tracker.revoke(revoked.leaseID)
            emitLine("lease \(revoked.leaseID) revoked: \(revoked.reason)")
          case .ack(let ack):
            if let problem = tracker.acknowledged(ack) { FileHandle.standardError.write(Data("tollctl: \(problem)\n".utf8)) }
          case nil:
            continue
          }
        }
      }
    )
  }
}

/// What a worker holds across its streams: the commands running, the results not yet
/// acknowledged, and the stream (if any) messages go out on now.
final class WorkerTracker: Sendable {
  let hello: Tollgate_V1_WorkerHello
  let command: String
  let fatalExitCode: Int32
  let maxTasks: Int

  init(hello: Tollgate_V1_WorkerHello, command: String, fatalExitCode: Int32, maxTasks: Int) {
    self.hello = hello
    self.command = command
    self.fatalExitCode = fatalExitCode
    self.maxTasks = maxTasks
  }

  struct Unacknowledged {
    var message: Tollgate_V1_WorkerMessage
    var runID: String
    /// Sent on a stream that ended before its ack: it may have been recorded then.
    var resent = false
  }

  struct State {
    var running: [String: TaskProcess] = [:]
    var results: [String: Unacknowledged] = [:]
    var out: AsyncStream<Tollgate_V1_WorkerMessage>.Continuation?
    var heartbeatInterval: Duration = .seconds(10)
    var finished = 0
    var done = false
    var heardFrom = false
    var streams = 0
    /// Stopping: the gateway was told to push nothing more; done once nothing is held.
    var draining = false
  }

  let state = Mutex(State())

  var heartbeatInterval: Duration { state.withLock { $0.heartbeatInterval } }
  var runningCount: Int { state.withLock { $0.running.count } }
  var isDone: Bool { state.withLock { $0.done } }

  /// A new stream's messages: the hello naming the leases still held, then every result not yet
  /// acknowledged, then what happens from now on. Taken under one lock, so a command that ends
  /// meanwhile is sent exactly once on this stream.
  /// On a stream after the first, `reconnect` says what it took back.
  func openStream() -> (AsyncStream<Tollgate_V1_WorkerMessage>, reconnect: (held: Int, results: Int)?) {
    let (outbound, out) = AsyncStream.makeStream(of: Tollgate_V1_WorkerMessage.self)
    let reconnect = state.withLock { s -> (held: Int, results: Int)? in
      var hello = self.hello
      hello.heldLeaseIds = s.running.keys.sorted()
      hello.draining = s.draining
      out.yield(.with { $0.hello = hello })
      for lease in s.results.keys.sorted() {
        out.yield(s.results[lease]!.message)
      }
      if s.done { out.finish() }
      s.out = out
      s.streams += 1
      return s.streams > 1 ? (hello.heldLeaseIds.count, s.results.count) : nil
    }
    return (outbound, reconnect)
  }

  /// The stream ended: results sent on it and not acknowledged are sent again on the next.
  func closeStream() {
    state.withLock { s in
      s.out?.finish()
      s.out = nil
      for lease in s.results.keys { s.results[lease]!.resent = true }
    }
  }

  func heard() { state.withLock { $0.heardFrom = true } }

  func takeHeardFrom() -> Bool {
    state.withLock { s in
      defer { s.heardFrom = false }
      return s.heardFrom
    }
  }

  /// Asks the gateway to push nothing more; returns how many commands are still running.
  func beginDrain() -> Int {
    state.withLock { s in
      s.draining = true
      s.out?.yield(.with { $0.drain = .init() })
      Self.finishIfDrained(&s)
      return s.running.count
    }
  }

  /// While draining, the worker is done once no command runs and every result is acknowledged.
  static func finishIfDrained(_ s: inout State) {
    guard s.draining, s.running.isEmpty, s.results.isEmpty, !s.done else { return }
    s.done = true
    s.out?.finish()
  }

  func heartbeat() {
    state.withLock { s in
      if !s.running.isEmpty { s.out?.yield(.with { $0.heartbeat = .init() }) }
    }
  }

  func start(_ task: Tollgate_V1_TaskAssignment) -> TaskProcess {
    let timeout = Duration.seconds(task.leaseTimeout.seconds) + .nanoseconds(Int64(task.leaseTimeout.nanos))
    let process = TaskProcess(command: command, task: task)
    state.withLock {
      $0.running[task.leaseID] = process
      if timeout > .zero { $0.heartbeatInterval = timeout / 3 }
    }
    return process
  }

  /// Runs `process` and sends its result, unless its lease was revoked meanwhile.
  func run(_ process: TaskProcess) async {
    let task = process.task
    let outcome = await process.run()
    let message = Tollgate_V1_WorkerMessage.with {
      if outcome.status == 0 {
        $0.completed = .with { $0.leaseID = task.leaseID; $0.result = outcome.stdout }
      } else {
        $0.failed = .with {
          $0.leaseID = task.leaseID
          $0.error = outcome.error
          $0.retryable = outcome.status != fatalExitCode
        }
      }
    }
    let revoked = state.withLock { s in
      guard s.running.removeValue(forKey: task.leaseID) != nil else {
        Self.finishIfDrained(&s)
        return true
      }
      s.results[task.leaseID] = Unacknowledged(message: message, runID: task.runID)
      s.out?.yield(message)
      return false
    }
    if revoked { return }
    emitLine("run \(task.runID) attempt \(task.attempt): \(outcome.status == 0 ? "completed" : "failed (exit \(outcome.status))")")
  }

  func revoke(_ lease: String) {
    let process = state.withLock { s in
      s.results[lease] = nil
      defer { Self.finishIfDrained(&s) }
      return s.running.removeValue(forKey: lease)
    }
    process?.terminate()
  }

  /// Records an ack; returns what to tell the user when the result was not recorded.
  func acknowledged(_ ack: Tollgate_V1_ResultAck) -> String? {
    state.withLock { s in
      let result = s.results.removeValue(forKey: ack.leaseID)
      s.finished += 1
      if maxTasks > 0 && s.finished >= maxTasks {
        s.done = true
        s.out?.finish()
      }
      Self.finishIfDrained(&s)
      guard !ack.accepted else { return nil }
      let run = result.map { "run \($0.runID)" } ?? "lease \(ack.leaseID)"
      if result?.resent == true {
        return "\(run): result sent again after a reconnect, not recorded now (it was recorded before the connection was lost, or the lease ended): \(ack.message)"
      }
      return "\(run): result not recorded: \(ack.message)"
    }
  }

  /// On exit: commands still running are stopped; their leases expire and the runs are retried.
  func stopAll() {
    let processes = state.withLock { s in
      defer { s.running = [:] }
      return Array(s.running.values)
    }
    for process in processes { process.terminate() }
  }
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
