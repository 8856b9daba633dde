import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Synchronization
import SwiftProtobuf
import TollgateClient
import TollgateMerkle
import TollgateProtos

struct Audit: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Read, export and verify a tenant's audit log (auditors: their own; operators: --tenant, or the platform log).",
    subcommands: [Tail.self, Export.self, Verify.self]
  )

  struct Filters: ParsableArguments {
    @Option(help: "First record index") var start: UInt64 = 0
    @Option(help: "Only this method, e.g. /tollgate.v1.TenantService/GetTenant (repeatable)") var method: [String] = []
    @Option(help: "Only calls by this SPIFFE ID") var principal: String?
    @Option(help: "Only calls that ended with this gRPC status code, e.g. 7 (repeatable)") var outcome: [Int32] = []
    @Option(help: "Only calls at or after this ISO 8601 time") var since: String?
    @Option(help: "Only calls before this ISO 8601 time") var until: String?

    func request() throws -> Tollgate_V1_StreamEventsRequest {
      func time(_ text: String?, _ flag: String) throws -> Google_Protobuf_Timestamp? {
        guard let text else { return nil }
        guard let date = ISO8601DateFormatter().date(from: text) else {
          throw ValidationError("\(flag) '\(text)' is not an ISO 8601 time such as 2026-11-22T10:00:00Z")
        }
        return Google_Protobuf_Timestamp(date: date)
      }
      let from = try time(since, "--since")
      let to = try time(until, "--until")
      return .with {
        $0.startIndex = start
        $0.methods = method
        $0.principalSpiffeID = principal ?? ""
        $0.outcomeCodes = outcome
        if from != nil || to != nil {
          $0.range = .with { range in
            if let from { range.startTime = from }
            if let to { range.endTime = to }
          }
        }
      }
    }
  }

  struct Tail: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Print audit records, one line each (or JSON lines).",
      discussion: """
        With --follow it runs until stopped. When the gateway goes away (a restart, a deploy's
        drain, a lost connection) it says so on stderr, reconnects with a growing pause (up to 5 s),
        and resumes after the last record it printed: none is skipped or printed twice.
        """
    )
    @OptionGroup var connection: ConnectionOptions
    @OptionGroup var filters: Filters
    @Flag(help: "Keep printing new records as they are committed") var follow = false
    @Flag(help: "Print each record as a JSON object on one line") var json = false

    func run() async throws {
      var request = try filters.request()
      request.follow = follow
      let json = self.json
      let next = Mutex(request.startIndex)
      var pause = ReconnectPause()
      while true {
        let from = next.withLock { $0 }
        request.startIndex = from
        do {
          try await connection.withClientOrRPCError { [request] client, metadata in
            try await AuditReader(client: client, metadata: metadata).records(request) { record in
              emitLine(try Audit.line(record, json: json))
              next.withLock { $0 = record.index + 1 }
              return true
            }
          }
          // Without --follow the stream ends with the log; a followed stream only when the
          // gateway ends it.
          guard follow else { return }
          FileHandle.standardError.write(Data("tollctl: the gateway ended the stream; reconnecting\n".utf8))
        } catch let error as RPCError {
          printError(error)
          guard follow && ReconnectPause.resumable(error) else { throw ExitCode(2) }
          FileHandle.standardError.write(Data("tollctl: reconnecting, to resume at record \(next.withLock { $0 })\n".utf8))
        }
        if next.withLock({ $0 }) != from { pause.reset() }
        try await pause.wait()
      }
    }
  }

  static func line(_ record: Tollgate_V1_AuditRecord, json: Bool) throws -> String {
    let event = record.event
    if json {
      var options = JSONEncodingOptions()
      options.preserveProtoFieldNames = true
      return try record.jsonString(options: options)
    }
    let time = ISO8601DateFormatter().string(from: event.time.date)
    let latency = Double(event.latency.seconds) * 1000 + Double(event.latency.nanos) / 1_000_000
    let code = Status.Code(rawValue: Int(event.outcomeCode)).map { "\($0)" } ?? "code \(event.outcomeCode)"
    let outcome = event.outcomeCode == 0 ? "ok" : code
    return [
      "\(record.index)", time, event.principal.spiffeID, event.method,
      event.resource.isEmpty ? "-" : event.resource, outcome, String(format: "%.1fms", latency),
    ].joined(separator: "  ")
  }

  /// An export: the checkpoint's signed note, then one record per line, leaf bytes in base64.
  struct ExportLine: Codable {
    var checkpoint: String?
    var index: UInt64?
    var leaf: String?
  }

  struct Export: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Write the log up to its latest checkpoint to a file (JSON lines) that 'audit verify --export' checks offline."
    )
    @OptionGroup var connection: ConnectionOptions
    @Option(help: "File to write") var out: String

    func run() async throws {
      guard FileManager.default.createFile(atPath: out, contents: nil) else {
        throw ValidationError("--out: cannot create \(out)")
      }
      let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: out))
      defer { try? handle.close() }
      let progress = Progress(label: "exported")
      try await connection.withClient { client, metadata in
        let reader = AuditReader(client: client, metadata: metadata)
        // The checkpoint first: records past it are committed later and not covered by it.
        let checkpoint = try await reader.checkpoint()
        let size = checkpoint.treeSize
        let encoder = JSONEncoder()
        try handle.write(contentsOf: try encoder.encode(ExportLine(checkpoint: checkpoint.signedNote)) + Data("\n".utf8))
        progress.total = size
        guard size > 0 else { return }
        let written = Mutex<UInt64>(0)
        try await reader.leaves(.init()) { batch in
          var chunk = Data()
          var last: UInt64 = 0
          for record in batch where record.index < size {
            chunk.append(try encoder.encode(ExportLine(index: record.index, leaf: Data(record.leaf).base64EncodedString())))
            chunk.append(0x0A)
            last = record.index
          }
          try handle.write(contentsOf: chunk)
          let count = written.withLock { $0 += UInt64(batch.count { $0.index < size }); return $0 }
          progress.update(count)
          return last + 1 < size
        }
        progress.finish()
        FileHandle.standardError.write(Data("wrote \(written.withLock { $0 }) records and the checkpoint of size \(size) to \(out)\n".utf8))
      }
    }
  }

  struct Verify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Verify a log with only the published key: re-compute the tree, check the checkpoint signature, and check proofs.",
      discussion: """
        From the gateway (default) or from an 'audit export' file (--export). A log read from index 0
        is re-hashed whole and compared with the signed root. A range starting later (--start) is
        re-hashed onto the hashes of the records before it, read off one inclusion proof, and compared
        the same way. When something is wrong the first bad index is named, located with the gateway's
        consistency proofs (each checked against the signed root).
        A scheduled check resumes from the checkpoint it last verified: --save-checkpoint FILE keeps
        it, and --since-checkpoint FILE next time checks that the log still extends it (every record
        it covered unchanged, by a consistency proof) and verifies only the records after it. Without
        a remembered checkpoint a log rewritten and signed again would verify.
        Exit status: 0 verified, 1 tampering found, 2 could not check.
        """
    )
    @OptionGroup var connection: ConnectionOptions
    @Option(help: "Verifier key: the text 'name+id+key' or a file holding it (the .pub from 'certs audit-key')") var key: String
    @Option(help: "Verify this export file instead of streaming from the gateway") var export: String?
    @Option(help: "Verify records from this index on (streamed from the gateway), without the records before it (default: 0, or the end of --since-checkpoint)") var start: UInt64?
    @Option(help: "A checkpoint verified earlier (a file written by --save-checkpoint): the log must still extend it") var sinceCheckpoint: String?
    @Option(help: "The key that signed --since-checkpoint, if the log's key was rotated since (default: --key)") var sinceKey: String?
    @Option(help: "After a successful check, write the verified checkpoint to this file (for --since-checkpoint next time)") var saveCheckpoint: String?

    func run() async throws {
      let verifier = AuditLogVerifier(key: try Self.verifierKey(key, option: "--key"))
      let earlier = try sinceCheckpoint.map { path in
        let earlierVerifier = try sinceKey.map { AuditLogVerifier(key: try Self.verifierKey($0, option: "--since-key")) } ?? verifier
        return try Self.savedCheckpoint(path, earlierVerifier)
      }
      do {
        let note = if let export {
          try await verifyExport(export, verifier, since: earlier)
        } else {
          try await verifyFromGateway(verifier, since: earlier)
        }
        if let saveCheckpoint {
          do { try Data(note.utf8).write(to: URL(fileURLWithPath: saveCheckpoint), options: .atomic) } catch {
            throw ValidationError("--save-checkpoint: cannot write \(saveCheckpoint): \(error.localizedDescription)")
          }
        }
      } catch let failure as AuditVerificationFailure {
        if case .unanswered = failure {
          FileHandle.standardError.write(Data("tollctl: COULD NOT CHECK: \(failure)\n".utf8))
          throw ExitCode(2)
        }
        FileHandle.standardError.write(Data("tollctl: NOT VERIFIED: \(failure)\n".utf8))
        throw ExitCode(1)
      }
    }

    /// A verifier key given as its text or as a file holding it.
    static func verifierKey(_ key: String, option: String) throws -> AuditVerifierKey {
      let keyText = FileManager.default.fileExists(atPath: key) ? try String(contentsOfFile: key, encoding: .utf8) : key
      do { return try AuditVerifierKey(text: keyText) } catch { throw ValidationError("\(option): \(error.description)") }
    }

    /// The checkpoint in `path`, which must verify with the key: it is the trust anchor of the
    /// check, so a damaged or foreign file is refused rather than trusted.
    static func savedCheckpoint(_ path: String, _ verifier: AuditLogVerifier) throws -> Checkpoint {
      let note: String
      do { note = try String(contentsOfFile: path, encoding: .utf8) } catch {
        throw ValidationError("--since-checkpoint: cannot read \(path): \(error.localizedDescription)")
      }
      do { return try verifier.checkpoint(note: note) } catch {
        throw ValidationError("--since-checkpoint: \(path) is not a checkpoint signed with this key (after a key rotation, name the earlier key with --since-key): \(error.description)")
      }
    }

    /// Refuses an earlier checkpoint of another log: the two say nothing about each other.
    static func requireSameLog(_ earlier: Checkpoint?, _ checkpoint: Checkpoint) throws {
      guard let earlier, earlier.origin != checkpoint.origin else { return }
      throw ValidationError("--since-checkpoint: that checkpoint is of log '\(earlier.origin)', and this log is '\(checkpoint.origin)'")
    }

    /// Verifies an export file; returns its checkpoint's signed note.
    func verifyExport(_ path: String, _ verifier: AuditLogVerifier, since earlier: Checkpoint?) async throws -> String {
      guard let data = FileManager.default.contents(atPath: path) else { throw ValidationError("--export: cannot read \(path)") }
      var note: String?
      var records: [(index: UInt64, leaf: [UInt8])] = []
      let decoder = JSONDecoder()
      for (number, line) in data.split(separator: 0x0A).enumerated() {
        let entry: ExportLine
        do { entry = try decoder.decode(ExportLine.self, from: line) } catch {
          throw ValidationError("--export: line \(number + 1) is not an export line")
        }
        if let checkpoint = entry.checkpoint { note = checkpoint }
        if let index = entry.index, let leaf = entry.leaf.flatMap({ Data(base64Encoded: $0) }) {
          records.append((index, Array(leaf)))
        }
      }
      guard let note else { throw ValidationError("--export: \(path) holds no checkpoint") }
      // The gateway, if reachable, only helps locate a bad record; every proof it gives is checked.
      let pinpoint: ((UInt64, UInt64) async throws -> [MerkleTree.Hash])? =
        (connection.identity ?? ProcessInfo.processInfo.environment["TOLLCTL_IDENTITY"]) == nil ? nil : { old, new in
          try await connection.withClient { client, metadata in
            try await AuditReader(client: client, metadata: metadata).consistencyProof(old: old, new: new)
          }
        }
      try Self.requireSameLog(earlier, try verifier.checkpoint(note: note))
      let checkpoint = try await verifier.verifyLog(records: records, checkpointNote: note, consistencyProof: pinpoint)
      if let earlier { try verifier.verifyExtends(earlier, to: checkpoint, records: records) }
      report(checkpoint, records: checkpoint.treeSize, since: earlier)
      return note
    }

    /// Verifies the log from the gateway; returns the verified checkpoint's signed note.
    func verifyFromGateway(_ verifier: AuditLogVerifier, since earlier: Checkpoint?) async throws -> String {
      try await connection.withClient { client, metadata in
        let reader = AuditReader(client: client, metadata: metadata)
        let note = try await reader.checkpoint().signedNote
        let checkpoint = try verifier.checkpoint(note: note)
        try Self.requireSameLog(earlier, checkpoint)
        if let earlier {
          try await verifier.verifyExtends(earlier, to: checkpoint) { old, new in
            try await reader.consistencyProof(old: old, new: new)
          }
        }
        let start = self.start ?? earlier?.treeSize ?? 0
        let size = checkpoint.treeSize
        let records = Mutex<[(index: UInt64, leaf: [UInt8])]>([])
        if start < size {
          try await reader.leaves(.with { $0.startIndex = start }) { batch in
            let within = batch.filter { $0.index < size }
            records.withLock { $0.append(contentsOf: within) }
            return within.count == batch.count && (within.last.map { $0.index + 1 < size } ?? true)
          }
        }
        let collected = records.withLock { $0 }
        if start == 0 {
          _ = try await verifier.verifyLog(records: collected, checkpointNote: note) { old, new in
            try await reader.consistencyProof(old: old, new: new)
          }
        } else {
          _ = try await verifier.verifyRange(
            from: start,
            records: collected,
            checkpointNote: note,
            edgeProof: { index, size in try await reader.inclusionProof(index: index, treeSize: size) }
          ) { old, new in
            try await reader.consistencyProof(old: old, new: new)
          }
        }
        report(checkpoint, records: size - min(start, size), since: earlier)
        return note
      }
    }

    func report(_ checkpoint: Checkpoint, records: UInt64, since earlier: Checkpoint?) {
      let extends = earlier.map { "; it extends the checkpoint of size \($0.treeSize) verified earlier" } ?? ""
      print("verified \(records) records against the checkpoint of size \(checkpoint.treeSize) (\(checkpoint.origin)), root \(Data(checkpoint.rootHash).base64EncodedString())\(extends)")
    }
  }
}

/// A one-line progress display on stderr when it is a terminal; silent otherwise.
final class Progress: Sendable {
  let label: String
  let enabled = isatty(STDERR_FILENO) != 0
  private let state = Mutex<(total: UInt64, shown: ContinuousClock.Instant?)>((0, nil))

  init(label: String) {
    self.label = label
  }

  var total: UInt64 {
    get { state.withLock { $0.total } }
    set { state.withLock { $0.total = newValue } }
  }

  func update(_ done: UInt64) {
    guard enabled else { return }
    let (total, due) = state.withLock { state -> (UInt64, Bool) in
      let now = ContinuousClock.now
      if let shown = state.shown, now - shown < .milliseconds(100) { return (state.total, false) }
      state.shown = now
      return (state.total, true)
    }
    guard due else { return }
    let percent = total == 0 ? 100 : Int(done * 100 / total)
    FileHandle.standardError.write(Data("\r\(label) \(done)/\(total) (\(percent)%)".utf8))
  }

  func finish() {
    guard enabled else { return }
    FileHandle.standardError.write(Data("\r\(label) \(total)/\(total) (100%)\n".utf8))
  }
}
