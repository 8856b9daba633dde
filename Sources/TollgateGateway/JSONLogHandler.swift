import Foundation
public import Logging
import Synchronization

/// One JSON object per line on stdout: `time` (RFC 3339, UTC, milliseconds), `level`, `message`,
/// `logger`, then the metadata's keys (nested metadata as objects, lists as arrays). Lines are
/// written whole with one `write(2)` each, so concurrent loggers never interleave.
///
/// What reaches a log is chosen where it is logged: calls log ids, names, codes and latencies,
/// never request payloads, keys or certificates.
public struct JSONLogHandler: LogHandler {
  public var metadata: Logger.Metadata = [:]
  public var logLevel: Logger.Level = .info
  let label: String
  let output: Output

  /// Where lines go; tests capture them.
  public final class Output: Sendable {
    let write: @Sendable ([UInt8]) -> Void
    public init(write: @escaping @Sendable ([UInt8]) -> Void) { self.write = write }

    public static let standardOutput = Output { bytes in
      bytes.withUnsafeBytes { buffer in
        var offset = 0
        while offset < buffer.count {
          let n = Foundation.write(STDOUT_FILENO, buffer.baseAddress! + offset, buffer.count - offset)
          if n <= 0 { return }
          offset += n
        }
      }
    }
  }

  public init(label: String, output: Output = .standardOutput) {
    self.label = label
    self.output = output
  }

  public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
    get { metadata[key] }
    set { metadata[key] = newValue }
  }

  public func log(event: LogEvent) {
    var line = "{\"time\":"
    Self.appendString(Self.timestamp(Date()), to: &line)
    line += ",\"level\":"
    Self.appendString(event.level.rawValue, to: &line)
    line += ",\"message\":"
    Self.appendString(event.message.description, to: &line)
    line += ",\"logger\":"
    Self.appendString(label, to: &line)
    var merged = metadata
    if let extra = event.metadata { merged.merge(extra) { _, new in new } }
    for key in merged.keys.sorted() where !["time", "level", "message", "logger"].contains(key) {
      line += ","
      Self.appendString(key, to: &line)
      line += ":"
      Self.append(merged[key]!, to: &line)
    }
    line += "}\n"
    output.write(Array(line.utf8))
  }

  static func append(_ value: Logger.Metadata.Value, to line: inout String) {
    switch value {
    case .string(let s):
      appendString(s, to: &line)
    case .stringConvertible(let c):
      // Numbers stay numbers, so log queries can compare them.
      if let n = c as? any BinaryInteger {
        line += "\(n)"
      } else if let d = c as? Double, d.isFinite {
        line += "\(d)"
      } else if let b = c as? Bool {
        line += b ? "true" : "false"
      } else {
        appendString(c.description, to: &line)
      }
    case .array(let items):
      line += "["
      for (i, item) in items.enumerated() {
        if i > 0 { line += "," }
        append(item, to: &line)
      }
      line += "]"
    case .dictionary(let dict):
      line += "{"
      for (i, key) in dict.keys.sorted().enumerated() {
        if i > 0 { line += "," }
        appendString(key, to: &line)
        line += ":"
        append(dict[key]!, to: &line)
      }
      line += "}"
    }
  }

  static func appendString(_ s: String, to line: inout String) {
    line += "\""
    for scalar in s.unicodeScalars {
      switch scalar {
      case "\"": line += "\\\""
      case "\\": line += "\\\\"
      case "\n": line += "\\n"
      case "\r": line += "\\r"
      case "\t": line += "\\t"
      case _ where scalar.value < 0x20:
        line += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count) + String(scalar.value, radix: 16)
      default: line.unicodeScalars.append(scalar)
      }
    }
    line += "\""
  }

  static func timestamp(_ date: Date) -> String {
    date.formatted(.iso8601.year().month().day().dateSeparator(.dash).time(includingFractionalSeconds: true).timeSeparator(.colon).timeZone(separator: .omitted))
  }
}
