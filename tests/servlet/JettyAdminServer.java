// An embedded Jetty 9 (Debian: libjetty9-java) answering "admin" from the servlet mapped at
// /pub/admin/* and "other" from everything else: tests/test_paths.py sends it paths through
// the gateway. Usage: java JettyAdminServer <port>
import java.io.IOException;
import java.net.InetSocketAddress;
import javax.servlet.http.HttpServlet;
import javax.servlet.http.HttpServletRequest;
import javax.servlet.http.HttpServletResponse;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.servlet.ServletContextHandler;
import org.eclipse.jetty.servlet.ServletHolder;

public class JettyAdminServer {
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
        Server server = new Server(new InetSocketAddress("127.0.0.1", Integer.parseInt(args[0])));
        ServletContextHandler context = new ServletContextHandler();
        context.setContextPath("/");
        context.addServlet(new ServletHolder(new Answer("admin")), "/pub/admin/*");
        context.addServlet(new ServletHolder(new Answer("other")), "/");
        server.setHandler(context);
        server.start();
        System.out.println("listening");
        server.join();
    }
}
