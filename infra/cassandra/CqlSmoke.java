// CQL round trip against the node infra/up started, run by infra/smoke as a single-file Java program
// (`java -cp <cassandra jars> CqlSmoke.java HOST PORT`). Uses the DataStax Java driver 3.x that ships
// (shaded) inside cassandra-all, at CQL protocol v4: the version the `scylla` Rust driver speaks.
import com.datastax.driver.core.Cluster;
import com.datastax.driver.core.ProtocolVersion;
import com.datastax.driver.core.Session;

public class CqlSmoke {
  public static void main(String[] args) {
    String host = args[0];
    int port = Integer.parseInt(args[1]);
    String ks = "cairn_smoke_" + ProcessHandle.current().pid();
    try (Cluster cluster = Cluster.builder().addContactPoint(host).withPort(port)
            .withProtocolVersion(ProtocolVersion.V4).withoutJMXReporting().withoutMetrics().build();
         Session s = cluster.connect()) {
      String version = s.execute("SELECT release_version FROM system.local").one().getString(0);
      s.execute("CREATE KEYSPACE " + ks
          + " WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}");
      s.execute("CREATE TABLE " + ks + ".t (id text PRIMARY KEY, v text)");
      s.execute("INSERT INTO " + ks + ".t (id, v) VALUES ('k', 'hello')");
      String v = s.execute("SELECT v FROM " + ks + ".t WHERE id = 'k'").one().getString(0);
      s.execute("DROP KEYSPACE " + ks);
      if (!"hello".equals(v)) throw new IllegalStateException("read back '" + v + "'");
      System.out.println("cql ok: Cassandra " + version + " on " + host + ":" + port
          + " (protocol v4, keyspace/table create, insert, select, drop)");
    }
  }
}
