import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Synchronization
import SwiftProtobuf
import TollgateProtos

typealias MeteringClient = Tollgate_V1_MeteringService.Client<HTTP2ClientTransport.Posix>

extension ConnectionOptions {
  /// Runs `body` with a MeteringService client; a gRPC failure prints its status and exits non-zero.
  func withMetering<T: Sendable>(_ body: (MeteringClient, Metadata) async throws -> T) async throws -> T {
    try await withClient { client, metadata in try await body(MeteringClient(wrapping: client), metadata) }
  }
}

/// An ISO 8601 time, with or without fractional seconds.
func parseTime(_ text: String, _ flag: String) throws -> Date {
  let plain = ISO8601DateFormatter()
  let fractional = ISO8601DateFormatter()
  fractional.formatOptions.insert(.withFractionalSeconds)
  guard let date = plain.date(from: text) ?? fractional.date(from: text) else {
    throw ValidationError("\(flag) '\(text)' is not an ISO 8601 time such as 2026-11-22T10:00:00Z")
  }
  return date
}

struct Usage: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Send usage events and query aggregated usage.",
    subcommands: [Ingest.self, Query.self]
  )

  struct Ingest: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Send usage events from a JSON-lines file (or stdin) over one IngestStream.",
      discussion: """
        One event per line: {"id": "e1", "source": "agent-1", "meter": "api_calls", "subject": "cust-1",
        "time": "2026-11-22T10:00:00Z", "value": 1, "properties": {"region": "eu"}}. time may also be
        Unix seconds. Re-sending a file is safe: events already stored count as duplicates.
        Exit status: 0 when every event was stored or already there, 1 when any was rejected, 2
        when the gateway refused the stream or no batch was acknowledged for --give-up-after.

        When the stream ends early (a drain, a restart, a lost connection, a rate to wait out), it
        says so on stderr and sends the batches not yet acknowledged on a new stream, after the
        gateway's grpc-retry-pushback-ms or a growing pause (up to 5 s).
        """
    )
    @OptionGroup var connection: ConnectionOptions
    @Option(help: "JSON-lines file; '-' or none reads stdin") var file: String?
    @Option(help: "Events per batch") var batchSize: Int = 500
    @Option(help: "Seconds to keep resuming without a batch acknowledged before giving up") var giveUpAfter: Int = 300

    func run() async throws {
      guard (1...100_000).contains(batchSize) else { throw ValidationError("--batch-size must be 1 to 100000") }
      guard giveUpAfter >= 0 else { throw ValidationError("--give-up-after must be 0 or more") }
      let data: Data
      if let file, file != "-" {
        guard let contents = FileManager.default.contents(atPath: file) else { throw ValidationError("cannot read \(file)") }
        data = contents
      } else {
        data = FileHandle.standardInput.readDataToEndOfFile()
      }
      var events: [(line: Int, event: Tollgate_V1_UsageEvent)] = []
      var unreadable = 0
      for (number, line) in String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
        let text = line.trimmingCharacters(in: .whitespaces)
        if text.isEmpty { continue }
        do {
          events.append((number + 1, try Self.event(text)))
        } catch {
          unreadable += 1
          FileHandle.standardError.write(Data("line \(number + 1): not sent: \(error)\n".utf8))
        }
      }
      let batches = stride(from: 0, to: events.count, by: batchSize).map { Array(events[$0..<min(events.count, $0 + batchSize)]) }
      let progress = Progress(label: "ingested")
      progress.total = UInt64(events.count)
      let totals = Mutex((accepted: 0, duplicates: 0, rejected: 0, done: 0))
      // Batches acknowledged so far (acks come in order), and the furthest batch written.
      let acked = Mutex(0)
      let written = Mutex(-1)
      var resent = 0
      var pause = ReconnectPause()
      let lastAck = Mutex(ContinuousClock.now)
      func summary() -> String {
        let t = totals.withLock { $0 }
        return "accepted \(t.accepted), duplicates \(t.duplicates), rejected \(t.rejected + unreadable)"
      }
      // What was stored before stopping, and where a later run can resume (re-sending the whole
      // input is safe too).
      func stop(_ why: String) throws -> Never {
        if !why.isEmpty { FileHandle.standardError.write(Data("tollctl: \(why)\n".utf8)) }
        progress.finish()
        print("stopped before batch \(acked.withLock { $0 } + 1) of \(batches.count): \(summary())")
        throw ExitCode(2)
      }
      // Every acknowledged batch is stored and a batch sent again counts its events once, so
      // the rest can go on a new stream: after a drain, a restart, a lost connection, or a rate
      // the gateway asks to wait out.
      func resume(after error: RPCError?, from: Int) async throws {
        let pushback = error?.metadata[stringValues: "grpc-retry-pushback-ms"].first(where: { _ in true }).flatMap { Int64($0) }
        // RESOURCE_EXHAUSTED without a time to wait (a message too large) would only repeat.
        if let error, !ReconnectPause.resumable(error) || (error.code == .resourceExhausted && pushback == nil) {
          try stop("")
        }
        if acked.withLock({ $0 }) != from { pause.reset() }
        let wait = pushback.map { Duration.milliseconds($0) } ?? pause.next
        if wait > .seconds(giveUpAfter) {
          try stop("giving up: the gateway asks to wait \(wait), longer than --give-up-after \(giveUpAfter) s")
        }
        if ContinuousClock.now - lastAck.withLock({ $0 }) + wait > .seconds(giveUpAfter) {
          try stop("giving up: no batch acknowledged for \(giveUpAfter) s (--give-up-after)")
        }
        let next = acked.withLock { $0 }
        resent += max(0, written.withLock { $0 } - next + 1)
        written.withLock { $0 = next - 1 }
        let why = error == nil ? "the gateway ended the stream early; " : ""
        FileHandle.standardError.write(Data("tollctl: \(why)resuming at batch \(next + 1) of \(batches.count) in \(wait)\n".utf8))
        try await pause.wait(wait)
      }
      while acked.withLock({ $0 }) < batches.count {
        let from = acked.withLock { $0 }
        do {
          try await connection.withClientOrRPCError { client, metadata in
            try await MeteringClient(wrapping: client).ingestStream(
              metadata: metadata,
              requestProducer: { writer in
                for i in from..<batches.count {
                  try await writer.write(
                    .with {
                      $0.sequence = UInt64(i + 1)
                      $0.events = batches[i].map(\.event)
                    }
                  )
                  written.withLock { $0 = max($0, i) }
                }
              },
              onResponse: { response in
                for try await ack in response.messages {
                  let index = acked.withLock { $0 }
                  guard ack.sequence == UInt64(index + 1) else {
                    throw RPCError(code: .internalError, message: "ack for batch \(ack.sequence) where \(index + 1) was due")
                  }
                  let batch = batches[index]
                  for rejection in ack.rejections {
                    let line = batch[Int(rejection.index)].line
                    FileHandle.standardError.write(Data("\nline \(line): \(rejection.reason): \(rejection.message)\n".utf8))
                  }
                  let done = totals.withLock {
                    $0.accepted += Int(ack.accepted)
                    $0.duplicates += Int(ack.duplicates)
                    $0.rejected += Int(ack.rejected)
                    $0.done += batch.count
                    return $0.done
                  }
                  acked.withLock { $0 += 1 }
                  lastAck.withLock { $0 = .now }
                  progress.update(UInt64(done))
                }
              }
            )
          }
          if acked.withLock({ $0 }) < batches.count {
            try await resume(after: nil, from: from)
          }
        } catch let error as RPCError {
          printError(error)
          try await resume(after: error, from: from)
        }
      }
      progress.finish()
      var line = summary()
      if resent > 0 {
        line += " (\(resent) batches were sent again after the stream ended unacknowledged; their events already stored count as duplicates)"
      }
      print(line)
      if totals.withLock({ $0.rejected }) + unreadable > 0 { throw ExitCode(1) }
    }

    static func event(_ line: String) throws -> Tollgate_V1_UsageEvent {
      guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
        throw ValidationError("expected a JSON object")
      }
      var event = Tollgate_V1_UsageEvent()
      for key in ["id", "source", "meter", "subject"] {
        guard let value = object[key] else { continue }
        guard let text = value as? String else { throw ValidationError("\(key) must be a string") }
        switch key {
        case "id": event.id = text
        case "source": event.source = text
        case "meter": event.meter = text
        default: event.subject = text
        }
      }
      switch object["time"] {
      case nil: break
      case let text as String: event.time = Google_Protobuf_Timestamp(date: try parseTime(text, "time"))
      case let seconds as NSNumber: event.time = Google_Protobuf_Timestamp(date: Date(timeIntervalSince1970: seconds.doubleValue))
      default: throw ValidationError("time must be an ISO 8601 string or Unix seconds")
      }
      if let value = object["value"] {
        guard let number = value as? NSNumber else { throw ValidationError("value must be a number") }
        event.value = number.doubleValue
      }
      if let properties = object["properties"] {
        guard let map = properties as? [String: Any] else { throw ValidationError("properties must be an object of strings") }
        for (key, value) in map {
          guard let text = value as? String else { throw ValidationError("property \(key) must be a string") }
          event.properties[key] = text
        }
      }
      return event
    }
  }

  struct Query: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Aggregate a meter's usage (every page) as a table or JSON.")
    @OptionGroup var connection: ConnectionOptions
    @Option(help: "Meter name") var meter: String
    @Option(help: "Range start, ISO 8601") var from: String
    @Option(help: "Range end, ISO 8601 (default: now)") var to: String?
    @Option(help: "Window size: minute, hour, day (default: one total)") var window: String?
    @Option(help: "Only this subject (repeatable)") var subject: [String] = []
    @Flag(help: "One row per subject") var groupBySubject = false
    @Option(help: "Group by this property key (repeatable; the meter must allow it)") var groupBy: [String] = []
    @Option(help: "Rows per request (1 to 10000)") var pageSize: Int32 = 1_000
    @Flag(help: "Print JSON (one QueryUsageResponse with every row)") var json = false

    func run() async throws {
      var request = Tollgate_V1_QueryUsageRequest.with {
        $0.meter = meter
        $0.subjects = subject
        $0.groupBySubject = groupBySubject
        $0.groupByProperties = groupBy
        $0.pageSize = pageSize
      }
      request.range.startTime = Google_Protobuf_Timestamp(date: try parseTime(from, "--from"))
      if let to { request.range.endTime = Google_Protobuf_Timestamp(date: try parseTime(to, "--to")) }
      switch window?.lowercased() {
      case nil: break
      case "minute": request.windowSize = .minute
      case "hour": request.windowSize = .hour
      case "day": request.windowSize = .day
      case let other?: throw ValidationError("--window '\(other)' must be minute, hour or day")
      }
      let rows = try await connection.withMetering { metering, metadata in
        var rows: [Tollgate_V1_UsageRow] = []
        while true {
          let page = try await metering.queryUsage(request, metadata: metadata)
          rows += page.rows
          if page.nextPageToken.isEmpty { return rows }
          request.pageToken = page.nextPageToken
        }
      }
      if json {
        try printJSON(Tollgate_V1_QueryUsageResponse.with { $0.rows = rows })
        return
      }
      let format = ISO8601DateFormatter()
      var table = [["WINDOW START", "WINDOW END"] + (groupBySubject ? ["SUBJECT"] : []) + groupBy.map { $0.uppercased() } + ["VALUE"]]
      for row in rows {
        table.append(
          [format.string(from: row.windowStart.date), format.string(from: row.windowEnd.date)]
            + (groupBySubject ? [row.subject] : []) + groupBy.map { row.group[$0] ?? "" } + [Self.number(row.value)]
        )
      }
      printTable(table)
    }

    static func number(_ value: Double) -> String {
      value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : String(value)
    }
  }
}

struct Meters: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Define and list meters.",
    subcommands: [Define.self, List.self]
  )

  struct Define: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Define a meter (or update its description and group-by keys).")
    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "Meter name (the events' meter type): 1 to 64 of a-z 0-9 _ . -") var name: String
    @Option(help: "sum, count, max, unique-count or latest") var aggregation: String
    @Option(help: "For unique-count: the property whose distinct values are counted") var valueProperty: String = ""
    @Option(help: "A property key queries may group by (repeatable)") var groupBy: [String] = []
    @Option(help: "Free text for people") var description: String = ""

    func run() async throws {
      let kind: Tollgate_V1_Aggregation
      switch aggregation.lowercased().replacingOccurrences(of: "_", with: "-") {
      case "sum": kind = .sum
      case "count": kind = .count
      case "max": kind = .max
      case "unique-count": kind = .uniqueCount
      case "latest": kind = .latest
      default: throw ValidationError("--aggregation '\(aggregation)' must be sum, count, max, unique-count or latest")
      }
      let reply = try await connection.withMetering { metering, metadata in
        try await metering.defineMeter(
          .with {
            $0.meter.name = name
            $0.meter.aggregation = kind
            $0.meter.valueProperty = valueProperty
            $0.meter.groupBy = groupBy
            $0.meter.description_p = description
          },
          metadata: metadata
        )
      }
      try printJSON(reply)
    }
  }

  struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List the tenant's meters (every page).")
    @OptionGroup var connection: ConnectionOptions
    @Flag(help: "Print JSON") var json = false

    func run() async throws {
      let meters = try await connection.withMetering { metering, metadata in
        var meters: [Tollgate_V1_Meter] = []
        var request = Tollgate_V1_ListMetersRequest.with { $0.pageSize = 1_000 }
        while true {
          let page = try await metering.listMeters(request, metadata: metadata)
          meters += page.meters
          if page.nextPageToken.isEmpty { return meters }
          request.pageToken = page.nextPageToken
        }
      }
      if json {
        try printJSON(Tollgate_V1_ListMetersResponse.with { $0.meters = meters })
        return
      }
      var table = [["NAME", "AGGREGATION", "VALUE PROPERTY", "GROUP BY", "DESCRIPTION"]]
      for meter in meters {
        let kind = String(describing: meter.aggregation).uppercased()
        table.append([meter.name, kind, meter.valueProperty, meter.groupBy.joined(separator: ","), meter.description_p])
      }
      printTable(table)
    }
  }
}

/// Prints rows as left-aligned columns, the first row a header.
func printTable(_ rows: [[String]]) {
  guard let width = rows.first?.count else { return }
  var widths = Array(repeating: 0, count: width)
  for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
  for row in rows {
    print(row.enumerated().map { i, cell in i == width - 1 ? cell : cell.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
      .joined(separator: "  "))
  }
}
