import ArgumentParser
import Foundation
import TollgateCertificates
import TollgateMerkle
import TollgateModel
import X509

struct Certs: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Make a certificate authority and issue gateway and principal certificates (no openssl needed).",
    subcommands: [InitCA.self, Issue.self, AuditKey.self]
  )

  struct AuditKey: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      commandName: "audit-key",
      abstract: "Make the Ed25519 key that signs audit checkpoints: writes FILE (0600, for --audit-signing-key) and FILE.pub (publish it)."
    )
    @Option(help: "File to write the signing key to; the verifier key goes to FILE.pub") var out: String
    @Option(help: "Key name shown in checkpoint signatures") var name: String = "tollgate-audit"
    @Flag(help: "Replace an existing key (earlier checkpoints stay verifiable with the old .pub)") var force = false

    func run() async throws {
      if FileManager.default.fileExists(atPath: out) && !force {
        throw ValidationError("\(out) exists; pass --force to replace it (keep the old .pub to verify older checkpoints)")
      }
      let key: AuditSigningKey
      do { key = try AuditSigningKey(name: name) } catch { throw ValidationError("--name: \(error.description)") }
      try PEMFiles.write(key.signerText + "\n", to: out, secret: true)
      try PEMFiles.write(key.verifierText + "\n", to: out + ".pub")
      print(key.verifierText)
    }
  }

  struct InitCA: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      commandName: "init-ca",
      abstract: "Create a CA: writes ca.pem, ca.key (0600) and trust-domain into --out."
    )
    @Option(help: "Folder to write the CA into") var out: String
    @Option(help: "SPIFFE trust domain the CA issues for, e.g. example.org") var trustDomain: String
    @Option(help: "Validity in days") var days: Int = 3650
    @Flag(help: "Replace an existing CA in --out") var force = false

    func run() async throws {
      guard SPIFFEID.isValidTrustDomain(trustDomain) else {
        throw ValidationError("--trust-domain '\(trustDomain)': use lowercase letters, digits, '.', '-' and '_'")
      }
      let existing = URL(fileURLWithPath: out).appendingPathComponent("ca.key").path
      if FileManager.default.fileExists(atPath: existing) && !force {
        throw ValidationError("\(existing) exists; pass --force to replace the CA (certificates it issued stop working)")
      }
      let ca = try CertificateAuthority.create(trustDomain: trustDomain, validity: TimeInterval(days) * 86_400)
      try PEMFiles.saveAuthority(ca, to: out)
      print("CA for trust domain \(trustDomain) written to \(out)")
    }
  }

  struct Issue: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Issue a certificate: writes cert.pem, key.pem (0600) and ca.pem into --out.",
      discussion: """
        A tenant principal:  --tenant acme --role partner --name billing
        An operator:         --operator alice
        The gateway server:  --server --dns localhost --ip 127.0.0.1
        """
    )
    @Option(help: "CA folder made by init-ca") var ca: String
    @Option(help: "Folder to write the certificate into") var out: String
    @Option(help: "Tenant id of a tenant principal") var tenant: String?
    @Option(help: "Role of a tenant principal: partner, agent, auditor, worker") var role: String?
    @Option(help: "Name of a tenant principal") var name: String?
    @Option(help: "Name of an operator principal") var `operator`: String?
    @Flag(help: "Issue the gateway's server certificate") var server = false
    @Option(help: "DNS name for a server certificate (repeatable)") var dns: [String] = []
    @Option(help: "IP address for a server certificate (repeatable)") var ip: [String] = []
    @Option(help: "Validity in days") var days: Int = 365

    func run() async throws {
      let authority = try PEMFiles.loadAuthority(from: ca)
      let subject: CertificateAuthority.Subject
      switch (server, `operator`, tenant) {
      case (true, nil, nil):
        guard !(dns.isEmpty && ip.isEmpty) else { throw ValidationError("--server needs at least one --dns or --ip") }
        subject = .server(dnsNames: dns, ipAddresses: ip)
      case (false, let op?, nil):
        guard SPIFFEID.isValidName(op) else { throw ValidationError("--operator '\(op)': use letters, digits, '.', '-', '_'") }
        subject = .principal(SPIFFEID(operatorNamed: op, trustDomain: authority.trustDomain))
      case (false, nil, let t?):
        let id: TenantID
        do { id = try TenantID(validating: t) } catch { throw ValidationError("--tenant: \(error)") }
        guard let roleText = role, let r = Role(rawValue: roleText), r != .operator else {
          throw ValidationError("--role must be one of partner, agent, auditor, worker")
        }
        guard let n = name, SPIFFEID.isValidName(n) else {
          throw ValidationError("--name is required: letters, digits, '.', '-', '_'")
        }
        subject = .principal(SPIFFEID(tenant: id, role: r, name: n, trustDomain: authority.trustDomain))
      default:
        throw ValidationError("give exactly one of --server, --operator NAME, or --tenant T --role R --name N")
      }
      let issued = try authority.issue(subject, validity: TimeInterval(days) * 86_400)
      try PEMFiles.saveIssued(issued, ca: authority, to: out)
      let serial = HexText.encode(issued.certificate.serialNumber.bytes)
      switch subject {
      case .principal(let id): print("issued \(id) (serial \(serial)) into \(out)")
      case .server: print("issued server certificate for \((dns + ip).joined(separator: ", ")) (serial \(serial)) into \(out)")
      }
    }
  }
}
