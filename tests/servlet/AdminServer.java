// An embedded Tomcat (Debian: libtomcat10-java) answering "admin" from the servlet mapped at
// /pub/admin/* and "other" from everything else: tests/test_paths.py sends it paths through
// the gateway. Usage: java AdminServer <port> <base directory>
import java.io.File;
import java.io.IOException;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import org.apache.catalina.Context;
import org.apache.catalina.startup.Tomcat;

public class AdminServer {
    static class Answer extends HttpServlet {
        private static final long serialVersionUID = 1L;
        private final String name;

        Answer(String name) {
            this.name = name;
        }

        @Override
        protected void service(HttpServletRequest req, HttpServletResponse resp) throws IOException {
            resp.setContentType("text/plain");
            resp.getWriter().print(name);
        }
    }

    public static void main(String[] args) throws Exception {
        Tomcat tomcat = new Tomcat();
        tomcat.setBaseDir(args[1]);
        tomcat.setPort(Integer.parseInt(args[0]));
        tomcat.getConnector().setProperty("address", "127.0.0.1");
        Context ctx = tomcat.addContext("", new File(args[1]).getAbsolutePath());
        Tomcat.addServlet(ctx, "admin", new Answer("admin")).addMapping("/pub/admin/*");
        Tomcat.addServlet(ctx, "other", new Answer("other")).addMapping("/");
        tomcat.start();
        System.out.println("listening");
        tomcat.getServer().await();
    }
}
