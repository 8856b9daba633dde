import Foundation
import GRPCCore
import SwiftProtobuf
import TollgateProtos

/// `grpc.reflection.v1.ServerReflection` (and v1alpha, which is wire-identical), serving the
/// descriptors embedded at code-generation time, so generic tools (grpcurl, grpcio-reflection,
/// Postman) can list and call the registered services.
struct ReflectionService: Grpc_Reflection_V1_ServerReflection.ServiceProtocol {
  let registeredServices: [String]
  private let files: [String: EmbeddedProtoFile]
  private let fileForSymbol: [String: String]

  init(registeredServices: [String]) {
    self.registeredServices = registeredServices.sorted()
    var files: [String: EmbeddedProtoFile] = [:]
    var bySymbol: [String: String] = [:]
    for file in EmbeddedProtoFiles.all {
      files[file.name] = file
      for symbol in file.symbols { bySymbol[symbol] = file.name }
    }
    self.files = files
    self.fileForSymbol = bySymbol
  }

  func serverReflectionInfo(
    request: StreamingServerRequest<Grpc_Reflection_V1_ServerReflectionRequest>,
    context: ServerContext
  ) async throws -> StreamingServerResponse<Grpc_Reflection_V1_ServerReflectionResponse> {
    StreamingServerResponse { writer in
      for try await message in request.messages {
        try await writer.write(self.answer(message))
      }
      return [:]
    }
  }

  func answer(_ request: Grpc_Reflection_V1_ServerReflectionRequest) -> Grpc_Reflection_V1_ServerReflectionResponse {
    var response = Grpc_Reflection_V1_ServerReflectionResponse()
    response.validHost = request.host
    response.originalRequest = request
    switch request.messageRequest {
    case .listServices:
      response.listServicesResponse = .with {
        $0.service = registeredServices.map { name in .with { $0.name = name } }
      }
    case .fileByFilename(let name):
      if let bytes = descriptors(startingAt: name) {
        response.fileDescriptorResponse = .with { $0.fileDescriptorProto = bytes }
      } else {
        response.errorResponse = notFound("no file named '\(name)'")
      }
    case .fileContainingSymbol(let symbol):
      let trimmed = symbol.hasPrefix(".") ? String(symbol.dropFirst()) : symbol
      if let file = fileForSymbol[trimmed], let bytes = descriptors(startingAt: file) {
        response.fileDescriptorResponse = .with { $0.fileDescriptorProto = bytes }
      } else {
        response.errorResponse = notFound("no symbol named '\(symbol)'")
      }
    case .fileContainingExtension(let ext):
      response.errorResponse = notFound("no extension \(ext.extensionNumber) of '\(ext.containingType)'; the API defines none")
    case .allExtensionNumbersOfType(let type):
      if fileForSymbol[type] != nil {
        response.allExtensionNumbersResponse = .with { $0.baseTypeName = type }
      } else {
        response.errorResponse = notFound("no type named '\(type)'")
      }
    case .none:
      response.errorResponse = .with {
        $0.errorCode = Int32(RPCError.Code.invalidArgument.rawValue)
        $0.errorMessage = "the request names no query"
      }
    }
    return response
  }

  /// The file and everything it imports, transitively, the file itself first.
  private func descriptors(startingAt name: String) -> [Data]? {
    guard files[name] != nil else { return nil }
    var ordered: [String] = []
    var seen: Set<String> = []
    var pending = [name]
    while let next = pending.popLast() {
      guard seen.insert(next).inserted, let file = files[next] else { continue }
      ordered.append(next)
      pending.append(contentsOf: file.dependencies.reversed())
    }
    return ordered.compactMap { files[$0].flatMap { Data(base64Encoded: $0.descriptorBase64) } }
  }

  private func notFound(_ message: String) -> Grpc_Reflection_V1_ErrorResponse {
    .with {
      $0.errorCode = Int32(RPCError.Code.notFound.rawValue)
      $0.errorMessage = message
    }
  }
}

/// v1alpha: the same messages under another package name, so requests and responses are
/// translated through their (identical) wire form.
struct ReflectionServiceV1Alpha: Grpc_Reflection_V1alpha_ServerReflection.ServiceProtocol {
  let v1: ReflectionService

  func serverReflectionInfo(
    request: StreamingServerRequest<Grpc_Reflection_V1alpha_ServerReflectionRequest>,
    context: ServerContext
  ) async throws -> StreamingServerResponse<Grpc_Reflection_V1alpha_ServerReflectionResponse> {
    StreamingServerResponse { writer in
      for try await message in request.messages {
        let translated = try Grpc_Reflection_V1_ServerReflectionRequest(serializedBytes: try message.serializedBytes() as [UInt8])
        let answer = v1.answer(translated)
        try await writer.write(
          try Grpc_Reflection_V1alpha_ServerReflectionResponse(serializedBytes: try answer.serializedBytes() as [UInt8])
        )
      }
      return [:]
    }
  }
}
