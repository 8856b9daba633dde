import Foundation
import SwiftProtobuf
import TollgateModel
import TollgateProtos
import TollgateServiceSupport

/// Checks one usage event on its own, so one bad event is reported with a reason and never
/// fails its batch. Anything Postgres would refuse (a NUL character) is refused here, because a
/// statement that fails would take the whole batch with it.
struct UsageValidation: Sendable {
  /// Why an event was refused: a reason code for programs and a sentence for people.
  struct Rejection: Error, Sendable {
    var reason: String
    var message: String
  }

  static let maxProperties = 32
  static let maxPropertyKeyLength = 64
  static let maxPropertyValueLength = 256
  static let maxPropertyBytes = 4_096
  static let maxFutureSkew: TimeInterval = 300

  let lateArrival: TimeInterval

  func validate(_ event: Tollgate_V1_UsageEvent, now: Date) -> Result<UsageEventRow, Rejection> {
    do {
      try Self.identifier(event.id, field: "id", max: 128)
      try Self.identifier(event.source, field: "source", max: 128)
      try Self.identifier(event.subject, field: "subject", max: 256)
      if event.meter.isEmpty { throw Rejection(reason: "MISSING_FIELD", message: "meter is required") }
      guard MeterDefinition.isValidName(event.meter) else {
        throw Rejection(
          reason: "UNKNOWN_METER",
          message: "meter '\(Self.clip(event.meter))' is not a meter name (1 to 64 of a-z 0-9 _ . -)"
        )
      }
      guard event.hasTime else { throw Rejection(reason: "MISSING_FIELD", message: "time is required") }
      guard let time = RequestFields.date(seconds: event.time.seconds, nanos: event.time.nanos) else {
        throw Rejection(reason: "INVALID_FIELD", message: "time \(RequestFields.timestampRange)")
      }
      if time.timeIntervalSince(now) > Self.maxFutureSkew {
        throw Rejection(
          reason: "TIME_IN_FUTURE",
          message: "time \(Self.format(time)) is more than 5 minutes ahead of the gateway's clock (\(Self.format(now))); check the agent's clock"
        )
      }
      if now.timeIntervalSince(time) > lateArrival {
        throw Rejection(
          reason: "TIME_TOO_OLD",
          message: "time \(Self.format(time)) is older than the late-arrival window of \(Int(lateArrival / 3_600)) hours"
        )
      }
      guard event.value.isFinite else {
        throw Rejection(reason: "NON_FINITE_VALUE", message: "value must be a finite number, got \(event.value)")
      }
      // Far beyond any one event's usage, and small enough that no sum or average of them can
      // overflow a double in the database (two values near 1e308 made every query of the meter fail).
      guard abs(event.value) <= Self.maxValue else {
        throw Rejection(reason: "VALUE_OUT_OF_RANGE", message: "value must be within ±1e15, got \(event.value)")
      }
      return .success(
        UsageEventRow(
          source: event.source,
          id: event.id,
          meter: event.meter,
          subject: event.subject,
          time: time,
          value: event.value,
          propertiesJSON: try Self.properties(event.properties)
        )
      )
    } catch let rejection as Rejection {
      return .failure(rejection)
    } catch {
      return .failure(Rejection(reason: "INVALID_FIELD", message: "\(error)"))
    }
  }

  static func identifier(_ value: String, field: String, max: Int) throws(Rejection) {
    if value.isEmpty { throw Rejection(reason: "MISSING_FIELD", message: "\(field) is required") }
    let length = value.unicodeScalars.count
    guard length <= max else {
      throw Rejection(reason: "INVALID_FIELD", message: "\(field) is \(length) characters; at most \(max) allowed")
    }
    guard !value.utf8.contains(0) else {
      throw Rejection(reason: "INVALID_FIELD", message: "\(field) must not contain NUL characters")
    }
  }

  /// The properties as a JSON object, keys sorted, after the count and size limits.
  static func properties(_ properties: [String: String]) throws(Rejection) -> String {
    if properties.isEmpty { return "{}" }
    guard properties.count <= maxProperties else {
      throw Rejection(
        reason: "PROPERTIES_TOO_LARGE",
        message: "\(properties.count) properties; at most \(maxProperties) allowed"
      )
    }
    var bytes = 0
    for (key, value) in properties {
      if key.isEmpty || key.unicodeScalars.count > maxPropertyKeyLength {
        throw Rejection(
          reason: "PROPERTIES_TOO_LARGE",
          message: "property key '\(clip(key))' must be 1 to \(maxPropertyKeyLength) characters"
        )
      }
      if value.unicodeScalars.count > maxPropertyValueLength {
        throw Rejection(
          reason: "PROPERTIES_TOO_LARGE",
          message: "property '\(clip(key))' has a value of \(value.unicodeScalars.count) characters; at most \(maxPropertyValueLength) allowed"
        )
      }
      if key.utf8.contains(0) || value.utf8.contains(0) {
        throw Rejection(reason: "INVALID_FIELD", message: "property '\(clip(key))' must not contain NUL characters")
      }
      bytes += key.utf8.count + value.utf8.count
    }
    guard bytes <= maxPropertyBytes else {
      throw Rejection(
        reason: "PROPERTIES_TOO_LARGE",
        message: "properties total \(bytes) bytes; at most \(maxPropertyBytes) allowed"
      )
    }
    var json = "{"
    for (i, key) in properties.keys.sorted().enumerated() {
      if i > 0 { json += "," }
      appendJSONString(key, to: &json)
      json += ":"
      appendJSONString(properties[key]!, to: &json)
    }
    json += "}"
    return json
  }

  static func appendJSONString(_ text: String, to out: inout String) {
    out += "\""
    for scalar in text.unicodeScalars {
      switch scalar {
      case "\"": out += "\\\""
      case "\\": out += "\\\\"
      case "\n": out += "\\n"
      case "\r": out += "\\r"
      case "\t": out += "\\t"
      default:
        if scalar.value < 0x20 {
          out += String(format: "\\u%04x", scalar.value)
        } else {
          out.unicodeScalars.append(scalar)
        }
      }
    }
    out += "\""
  }

  /// The largest magnitude of an event's value (see the check in `validate`).
  static let maxValue = 1e15

  /// A value quoted back in a message, cut short so a huge bad value does not make a huge reply.
  static func clip(_ text: String) -> String {
    text.unicodeScalars.count <= 64 ? text : String(String.UnicodeScalarView(text.unicodeScalars.prefix(64))) + "…"
  }

  static func format(_ date: Date) -> String {
    date.formatted(.iso8601)
  }
}
