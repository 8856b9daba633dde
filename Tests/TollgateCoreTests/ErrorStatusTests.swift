import GRPCCore
import GRPCProtobuf
import Testing

import TollgateCore

/// What a status repeats of a request is capped, so it always fits the trailers a client accepts.
@Suite struct ErrorStatusTests {
  @Test func clippingKeepsWholeCharactersWithinTheByteBudget() {
    #expect(TollgateError.clipped("short", maxBytes: 10) == "short")
    let clipped = TollgateError.clipped(String(repeating: "名", count: 100), maxBytes: 20)
    #expect(clipped.utf8.count <= 20)
    #expect(clipped == String(repeating: "名", count: 5) + "…")
    // A flag emoji is one character of 8 bytes: it is kept whole or not at all.
    #expect(TollgateError.clipped(String(repeating: "🇸🇪", count: 4), maxBytes: 12) == "🇸🇪…")
  }

  @Test func anInvalidArgumentWithHugeFieldsFitsInTrailers() throws {
    let huge = String(repeating: "x", count: 20_000)
    let violations = (0..<25).map { TollgateError.FieldViolation(field: "f\($0)" + huge, description: huge) }
    let error = TollgateError.invalidFields("request", violations)
    #expect(error.rpcErrorMessage.utf8.count <= 512)
    #expect(error.rpcErrorMessage.hasPrefix("invalid request: f0xxx"))

    let status = try #require(try error.rpcError.unpackGoogleRPCStatus())
    let shown = try #require(status.details.first?.badRequest).violations
    #expect(shown.count == 11)
    #expect(shown.prefix(10).allSatisfy { $0.field.utf8.count <= 100 && $0.violationDescription.utf8.count <= 200 })
    #expect(shown.last?.violationDescription == "and 15 more field violations")
    let trailerBytes = error.rpcErrorMetadata.reduce(0) { total, entry in
      switch entry.value {
      case .string(let s): return total + entry.key.utf8.count + s.utf8.count
      case .binary(let b): return total + entry.key.utf8.count + (b.count + 2) / 3 * 4
      }
    }
    #expect(trailerBytes < 8_192)
  }
}
