import Foundation
public import GRPCCore
import SwiftProtobuf
import TollgateProtos

/// The shape of every method of the API, read from the embedded descriptors: interceptors are
/// generic over message types and are not told whether a call streams.
public enum MethodCatalog {
  public struct Shape: Sendable, Hashable {
    public var clientStreaming: Bool
    public var serverStreaming: Bool

    /// `unary`, `client_stream`, `server_stream` or `bidi_stream`, as gRPC metrics spell it.
    public var callType: String {
      switch (clientStreaming, serverStreaming) {
      case (false, false): return "unary"
      case (true, false): return "client_stream"
      case (false, true): return "server_stream"
      case (true, true): return "bidi_stream"
      }
    }
  }

  /// Shapes by fully qualified method name ("tollgate.v1.TenantService/GetTenant").
  public static let shapes: [String: Shape] = {
    var shapes: [String: Shape] = [:]
    for file in EmbeddedProtoFiles.all {
      guard let data = Data(base64Encoded: file.descriptorBase64),
        let descriptor = try? Google_Protobuf_FileDescriptorProto(serializedBytes: data)
      else { continue }
      for service in descriptor.service {
        let prefix = descriptor.package.isEmpty ? service.name : "\(descriptor.package).\(service.name)"
        for method in service.method {
          shapes["\(prefix)/\(method.name)"] = Shape(
            clientStreaming: method.clientStreaming,
            serverStreaming: method.serverStreaming
          )
        }
      }
    }
    return shapes
  }()

  public static func shape(of method: MethodDescriptor) -> Shape? {
    shapes[method.fullyQualifiedMethod]
  }
}
